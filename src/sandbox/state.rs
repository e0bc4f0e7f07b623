//! The sandbox's data: groups, orders, and the counters the
//! stats endpoint reports. Behaves like the real API, including the parts that
//! hurt: creates are not idempotent, and a second create for an order
//! makes a second group and re-links the order.

use std::collections::{BTreeMap, HashMap};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The sandbox's world.
#[derive(Debug, Default)]
pub(crate) struct World {
    /// group id → the group, kept as the JSON the API would send (snake_case).
    pub groups: HashMap<String, Value>,
    share_ids: HashMap<String, String>,
    /// order id → its current group id (None: the order exists without a group).
    pub orders: HashMap<String, Option<String>>,
    /// Groups created per order (or payment intent) key: the duplicate detector.
    pub groups_per_key: HashMap<String, u32>,
    pub requests: BTreeMap<String, u64>,
}

/// What the stats endpoint returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Requests by "METHOD /route STATUS" (faults included; "dropped" for cut connections).
    pub requests: BTreeMap<String, u64>,
    pub groups_total: u64,
    /// Orders (or payment intents) with at least one group.
    pub keys_with_groups: u64,
    /// Orders (or payment intents) with more than one group: must stay 0.
    pub duplicate_keys: u64,
    /// Up to 100 of those, with their group counts.
    pub duplicates: BTreeMap<String, u32>,
    pub peak_concurrency: u64,
    /// Order ids asked for in `GET /orders?search=` lists.
    #[serde(default)]
    pub list_ids_asked: u64,
    /// Most requests started within any one-second window.
    pub max_starts_in_one_second: u64,
    /// Groups per order (or payment intent); filled with `?detail=1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_per_key: Option<BTreeMap<String, u32>>,
}

/// Customer ids with this prefix do not exist (404 `Customer <id> not found.`).
pub(crate) const UNKNOWN_CUSTOMER: &str = "cus_unknown";
/// Customer ids with this prefix fail server-side validation (400, message array).
pub(crate) const REJECTED_CUSTOMER: &str = "cus_reject";
/// Order ids with this prefix do not exist (404 `Object not found`).
pub(crate) const UNKNOWN_ORDER: &str = "ord_unknown";
/// Order ids with this prefix came through checkout and already have a group.
pub(crate) const CHECKOUT_ORDER: &str = "ord_checkout";
/// Orders that name a group the group lookup answers with an empty 200.
pub(crate) const GHOST_GROUP_ORDER: &str = "ord_ghost";
/// Customers whose groups never get a share id.
pub(crate) const NO_SHARE_ID: &str = "cus_noshare";
/// Customers whose groups get their share id just after the create answers: the
/// create's reply has none, a later `GET /groups/{id}` has it.
pub(crate) const LATE_SHARE_ID: &str = "cus_lateshare";

/// A rejected request: status and the `message` of the error envelope.
#[derive(Debug)]
pub(crate) struct Rejection {
    pub status: u16,
    pub message: Value,
}

fn reject(status: u16, message: Value) -> Rejection {
    Rejection { status, message }
}

/// A field of a request body, named `(snake, camel)` as the client's parser names
/// them; the server reads the camelCase spelling first, as its request bodies are
/// camelCase, and takes the snake_case one when that is missing (a null counts as
/// present there, but the result is then `None`).
fn field<'a>(obj: &'a Map<String, Value>, snake: &str, camel: &str) -> Option<&'a Value> {
    obj.get(camel)
        .or_else(|| obj.get(snake))
        .filter(|v| !v.is_null())
}

/// The customer id of a create: a non-empty string the server accepts the form of.
fn check_customer(obj: &Map<String, Value>) -> Result<&str, Rejection> {
    match field(obj, "customer_id", "customerId") {
        Some(Value::String(s)) if !s.is_empty() => {
            if s.starts_with(REJECTED_CUSTOMER) {
                return Err(reject(
                    400,
                    json!([
                        format!("customerId {s} is not a valid customer id"),
                        "customerId must belong to this account"
                    ]),
                ));
            }
            Ok(s)
        }
        _ => Err(reject(
            400,
            json!([
                "customerId should not be empty",
                "customerId must be a string"
            ]),
        )),
    }
}

/// An expiry must be an ISO 8601 time from a minute after `now` to 90 days after
/// the server started.
fn check_expires_at(e: &Value, now: Timestamp, booted: Timestamp) -> Result<(), Rejection> {
    let parsed = e.as_str().and_then(|s| s.parse::<Timestamp>().ok());
    let Some(t) = parsed else {
        return Err(reject(
            400,
            json!(["expiresAt must be a valid ISO 8601 date string"]),
        ));
    };
    let (lo, hi) = (
        now + SignedDuration::from_mins(1),
        booted + SignedDuration::from_hours(90 * 24),
    );
    if t < lo || t > hi {
        return Err(reject(
            400,
            json!([format!(
                "expiresAt must be between {} and {}",
                crate::text::api_time(lo),
                crate::text::api_time(hi)
            )]),
        ));
    }
    Ok(())
}

impl World {
    fn hex(rng: &mut fastrand::Rng, n: usize) -> String {
        (0..n)
            .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
            .collect()
    }

    fn share_code(rng: &mut fastrand::Rng) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        (0..8)
            .map(|_| ALPHABET[rng.usize(..ALPHABET.len())] as char)
            .collect()
    }

    /// Makes an order known; checkout orders arrive with a group already.
    fn ensure_order(&mut self, rng: &mut fastrand::Rng, order_id: &str, now: Timestamp) {
        if self.orders.contains_key(order_id) {
            return;
        }
        if order_id.starts_with(GHOST_GROUP_ORDER) {
            // The order names a group that `GET /groups/{id}` cannot show (the API's
            // empty 200).
            self.orders
                .insert(order_id.to_owned(), Some(format!("pg_ghost_{order_id}")));
            return;
        }
        self.orders.insert(order_id.to_owned(), None);
        if order_id.starts_with(CHECKOUT_ORDER) {
            let body = json!({"customerId": "cus_checkout", "orderId": order_id});
            if let Some(obj) = body.as_object() {
                let _ =
                    self.insert_group(rng, obj, false, now, now + SignedDuration::from_hours(240));
            }
        }
    }

    /// `GET /orders/{id}`.
    pub(crate) fn order(
        &mut self,
        rng: &mut fastrand::Rng,
        id: &str,
        now: Timestamp,
    ) -> Result<Value, Rejection> {
        if id.starts_with(UNKNOWN_ORDER) {
            return Err(reject(404, json!("Object not found")));
        }
        self.ensure_order(rng, id, now);
        let group = self.orders.get(id).cloned().flatten();
        Ok(json!({"id": id, "object": "order", "payment_group_id": group, "livemode": false}))
    }

    /// `GET /orders?search=…&take=…&skip=…`, the server's list grammar: conditions
    /// split at `,` (all must hold) and at ` OR ` (one must), each `field:value`
    /// compared exactly (`id`, `payment_group_id`). Orders named by an `id:`
    /// condition are looked up as `GET /orders/{id}` would (made on first sight);
    /// `(data, count)`, ordered by id.
    pub(crate) fn list_orders(
        &mut self,
        rng: &mut fastrand::Rng,
        search: &str,
        take: usize,
        skip: usize,
        now: Timestamp,
    ) -> (Vec<Value>, usize) {
        let all: Vec<Vec<(&str, &str)>> = search
            .split(',')
            .map(|any| {
                any.split(" OR ")
                    .filter_map(|cond| cond.trim().split_once(':'))
                    .collect::<Vec<_>>()
            })
            // No condition (no `search`): every order.
            .filter(|any| !any.is_empty())
            .collect();
        for (field, value) in all.iter().flatten() {
            if *field == "id" && !value.starts_with(UNKNOWN_ORDER) {
                self.ensure_order(rng, value, now);
            }
        }
        let holds = |id: &str, group: Option<&str>| {
            all.iter().all(|any| {
                any.iter().any(|(field, value)| match *field {
                    "id" => id == *value,
                    "payment_group_id" => group == Some(*value),
                    _ => false,
                })
            })
        };
        let mut found: Vec<(&String, &Option<String>)> = self
            .orders
            .iter()
            .filter(|(id, g)| holds(id, g.as_deref()))
            .collect();
        found.sort();
        let count = found.len();
        let data = found
            .into_iter()
            .skip(skip)
            .take(take)
            .map(|(id, g)| json!({"id": id, "object": "order", "payment_group_id": g, "livemode": false}))
            .collect();
        (data, count)
    }

    /// `GET /groups/{id}` by group id or share id; `None` is the API's empty 200.
    pub fn group(&self, id: &str) -> Option<Value> {
        let gid = self.share_ids.get(id).map_or(id, String::as_str);
        self.groups.get(gid).cloned()
    }

    /// Validates a create like the server does, without side effects: the shape of
    /// each field first (400), then whether the customer and order exist (404).
    pub(crate) fn validate_create(
        &self,
        body: &Value,
        now: Timestamp,
        booted: Timestamp,
    ) -> Result<(), Rejection> {
        let Some(obj) = body.as_object() else {
            return Err(reject(
                400,
                json!(["the request body must be a JSON object"]),
            ));
        };
        let customer = check_customer(obj)?;
        let order = field(obj, "order_id", "orderId");
        let pi = field(obj, "payment_intent_id", "paymentIntentId");
        if order.is_none() && pi.is_none() {
            return Err(reject(
                400,
                json!("Either orderId or paymentIntentId is required."),
            ));
        }
        if let Some(m) = field(obj, "metadata", "metadata")
            && !m.is_object()
        {
            return Err(reject(400, json!(["metadata must be an object"])));
        }
        if let Some(e) = field(obj, "expires_at", "expiresAt") {
            check_expires_at(e, now, booted)?;
        }
        if customer.starts_with(UNKNOWN_CUSTOMER) {
            return Err(reject(
                404,
                json!(format!("Customer {customer} not found.")),
            ));
        }
        if let Some(Value::String(o)) = order
            && o.starts_with(UNKNOWN_ORDER)
        {
            return Err(reject(404, json!("Object not found")));
        }
        Ok(())
    }

    /// Creates a group (already validated) and links it. Never idempotent.
    pub(crate) fn create(
        &mut self,
        rng: &mut fastrand::Rng,
        body: &Value,
        live: bool,
        now: Timestamp,
    ) -> Value {
        let default_end = now
            + if live {
                SignedDuration::from_hours(7 * 24)
            } else {
                SignedDuration::from_mins(10)
            };
        let obj = body.as_object().cloned().unwrap_or_default();
        let end = field(&obj, "expires_at", "expiresAt")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Timestamp>().ok())
            .unwrap_or(default_end);
        if let Some(Value::String(o)) = field(&obj, "order_id", "orderId") {
            let o = o.clone();
            self.ensure_order(rng, &o, now);
        }
        self.insert_group(rng, &obj, live, now, end)
    }

    fn insert_group(
        &mut self,
        rng: &mut fastrand::Rng,
        obj: &Map<String, Value>,
        live: bool,
        now: Timestamp,
        end: Timestamp,
    ) -> Value {
        let id = format!("pg_{}", Self::hex(rng, 14));
        let share_id = if live {
            format!("KHT-{}", Self::share_code(rng))
        } else {
            format!("KHT-test-{}", Self::share_code(rng))
        };
        let text = |snake, camel| {
            field(obj, snake, camel)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let order = text("order_id", "orderId");
        let pi = text("payment_intent_id", "paymentIntentId");
        let mid = now + SignedDuration::from_secs(end.duration_since(now).as_secs() / 2);
        // Deterministic rules for tests: a group that never gets a share id.
        let customer = text("customer_id", "customerId").unwrap_or_default();
        let share = if customer.starts_with(NO_SHARE_ID) {
            Value::Null
        } else {
            Value::String(share_id.clone())
        };
        let group = json!({
            "id": id,
            "share_id": share,
            "livemode": live,
            "status": "OPEN",
            "customer_id": text("customer_id", "customerId"),
            "order_id": order,
            "payment_intent_id": pi,
            "creator_email": null,
            "metadata": field(obj, "metadata", "metadata"),
            "expires_at": crate::text::api_time(end),
            "mid_expire_at": crate::text::api_time(mid),
            "j_minus2_expire_at": null,
            "j_plus3_start_at": null,
            "reminder_email_sent": "NOT_SENT",
            "created_at": crate::text::api_time(now),
            "created_by": null,
            "updated_at": crate::text::api_time(now),
            "updated_by": null,
            "canceled_at": null,
            "completed_at": null,
        });
        // With both ids, the group counts for the payment intent; the order is not re-linked.
        let key = match (&pi, &order) {
            (Some(p), _) => format!("pi:{p}"),
            (None, Some(o)) => {
                self.orders.insert(o.clone(), Some(id.clone()));
                o.clone()
            }
            (None, None) => format!("none:{id}"),
        };
        *self.groups_per_key.entry(key).or_default() += 1;
        self.share_ids.insert(share_id, id.clone());
        self.groups.insert(id, group.clone());
        group
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn second_create_for_an_order_duplicates_and_relinks() {
        let mut w = World::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let body = json!({"customerId": "cus_1", "orderId": "ord_1"});
        let g1 = w.create(&mut rng, &body, false, now());
        let g2 = w.create(&mut rng, &body, false, now());
        assert_ne!(g1["id"], g2["id"]);
        assert_eq!(w.groups_per_key["ord_1"], 2);
        let order = w.order(&mut rng, "ord_1", now()).unwrap();
        assert_eq!(order["payment_group_id"], g2["id"]);
        let share = g1["share_id"].as_str().unwrap();
        assert!(share.starts_with("KHT-test-"));
        assert_eq!(w.group(share).unwrap()["id"], g1["id"]);
        assert!(w.group("pg_nope").is_none());
        let id = g1["id"].as_str().unwrap();
        assert!(id.starts_with("pg_") && id.len() == 17);
    }

    #[test]
    fn server_validation_rules() {
        let w = World::default();
        let check = |body: Value| {
            w.validate_create(&body, now(), now())
                .map_err(|r| (r.status, r.message))
        };
        assert!(check(json!({"customer_id": "cus_1", "order_id": "o"})).is_ok());
        assert_eq!(check(json!({"orderId": "o"})).unwrap_err().0, 400);
        assert_eq!(
            check(json!({"customerId": "c"})).unwrap_err().1,
            json!("Either orderId or paymentIntentId is required.")
        );
        assert!(check(json!({"customerId": "c", "orderId": "o", "metadata": [1]})).is_err());
        assert!(
            check(json!({"customerId": "c", "orderId": "o", "expiresAt": "2026-11-24T12:00:30Z"}))
                .is_err()
        );
        assert_eq!(
            check(json!({"customerId": "cus_unknown_1", "orderId": "o"}))
                .unwrap_err()
                .0,
            404
        );
        assert_eq!(
            check(json!({"customerId": "c", "orderId": "ord_unknown_1"}))
                .unwrap_err()
                .0,
            404
        );
        assert!(
            check(json!({"customerId": "cus_reject_1", "orderId": "o"}))
                .unwrap_err()
                .1
                .is_array()
        );
    }

    #[test]
    fn fields_are_named_snake_then_camel_and_camel_is_read_first() {
        let body = json!({"order_id": "o_snake", "orderId": "o_camel", "customer_id": "c",
                          "customerId": null, "metadata": {}});
        let obj = body.as_object().unwrap();
        assert_eq!(field(obj, "order_id", "orderId"), Some(&json!("o_camel")));
        // Present but null, the camelCase one still hides the other.
        assert_eq!(field(obj, "customer_id", "customerId"), None);
        assert_eq!(field(obj, "metadata", "metadata"), Some(&json!({})));
        assert_eq!(field(obj, "expires_at", "expiresAt"), None);
    }

    #[test]
    fn checkout_orders_already_have_a_group() {
        let mut w = World::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let order = w.order(&mut rng, "ord_checkout_1", now()).unwrap();
        assert!(order["payment_group_id"].is_string());
        assert_eq!(
            w.order(&mut rng, "ord_plain", now()).unwrap()["payment_group_id"],
            Value::Null
        );
        assert!(w.order(&mut rng, "ord_unknown_2", now()).is_err());
    }
}
