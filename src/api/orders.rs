//! `GET /orders?search=id:a OR id:b …`: many existence checks in one request (see
//! `docs/api-notes.md#list-and-search-grammar` for what the API promises, and what
//! it does not).

use super::wire::{self, ListedOrder};
use super::{ApiClient, Reply};

/// The most orders one list request may ask for (`take`: more is a 400).
pub(crate) const LIST_TAKE: usize = 25;

/// Whether an order id can be put in a search as it is: ASCII letters, digits, `_`,
/// `-` and `.` only. Anything else (`,`, spaces, `%`, quotes, operator characters)
/// could change what the search means, so such an order is checked on its own.
pub(crate) fn searchable(order_id: &str) -> bool {
    !order_id.is_empty()
        && order_id.len() <= 256
        && order_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl ApiClient {
    /// `GET /orders?search=id:…&take=…`: the listed orders among `order_ids` (at most
    /// [`LIST_TAKE`], each [`searchable`]). Which of them the answer may be trusted
    /// for is the caller's business: only those it asked for.
    pub(crate) async fn list_orders(&self, order_ids: &[&str]) -> Reply<Vec<ListedOrder>> {
        debug_assert!(order_ids.len() <= LIST_TAKE && order_ids.iter().all(|id| searchable(id)));
        let search = order_ids
            .iter()
            .map(|id| format!("id:{id}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let take = order_ids.len().clamp(1, LIST_TAKE);
        // Searchable ids and ` OR ` need no escaping but for the spaces.
        let search = search.replace(' ', "%20");
        let req = self
            .http
            .get(format!("{}/orders?search={search}&take={take}", self.base));
        self.exchange(req, wire::parse_order_list, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_go_in_a_search() {
        for ok in ["ord_1", "ORD-2.b", "123456"] {
            assert!(searchable(ok), "{ok}");
        }
        for bad in [
            "", "a,b", "a OR b", "a AND b", "a%2Cb", "a\"b", "a'b", "a:b", "a>=b", "a<b", "a=b",
            "a~b", "a!b", "a b", "a+b", "ordé", "a\tb",
        ] {
            assert!(!searchable(bad), "{bad:?}");
        }
        assert!(!searchable(&"x".repeat(257)));
    }
}
