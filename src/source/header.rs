//! The header: what each column means (case, spaces and snake/camel case folded),
//! and the checks a header must pass before any row is read.

use crate::job::Field;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Column {
    /// A field of the request body (the table is [`Field`]).
    Field(Field),
    MetadataKey(String),
    /// Columns that `export failures` adds; ignored on re-import.
    ExportOnly,
    Unknown,
}

pub(super) fn column_for(header: &str) -> Column {
    let trimmed = header.trim();
    if let Some(rest) = trimmed
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case("metadata."))
        .map(|_| &trimmed[9..])
    {
        return Column::MetadataKey(rest.to_owned());
    }
    if let Some(field) = Field::for_header(trimmed) {
        return Column::Field(field);
    }
    match trimmed.to_ascii_lowercase().as_str() {
        "error" | "line" | "state" | "source" => Column::ExportOnly,
        _ => Column::Unknown,
    }
}

/// The canonical name of an input column (`customer_id` → `customerId`,
/// `Metadata.x` → `metadata.x`); `None` for columns that are not input.
pub fn canonical_header(header: &str) -> Option<String> {
    Some(match column_for(header) {
        Column::Field(f) => f.name().to_owned(),
        Column::MetadataKey(k) => format!("metadata.{k}"),
        Column::ExportOnly | Column::Unknown => return None,
    })
}

/// Two header columns that name one field (after case, space and snake/camel
/// folding): the message naming both, or `None`. Which one to send is the person's
/// call, never a silent pick.
fn same_field_twice(headers: &[String], columns: &[Column]) -> Option<String> {
    for (j, column) in columns.iter().enumerate() {
        if matches!(column, Column::ExportOnly | Column::Unknown) {
            continue;
        }
        if let Some(i) = columns[..j].iter().position(|c| c == column) {
            let field = canonical_header(&headers[j]).unwrap_or_else(|| headers[j].clone());
            return Some(format!(
                "columns {} ({:?}) and {} ({:?}) both give {field}: keep one of them (rename \
                 or delete the other) and run again; nothing was imported",
                i + 1,
                headers[i],
                j + 1,
                headers[j]
            ));
        }
    }
    None
}

/// Up to 20 names, then how many more: a header of 100,000 unknown columns makes one
/// readable line, not 100,000.
pub fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Whether the columns can make a request: no field given twice, a customer id and
/// an order or payment intent id. The message says what to change.
pub(super) fn check_columns(headers: &[String], columns: &[Column]) -> Result<(), String> {
    if let Some(message) = same_field_twice(headers, columns) {
        return Err(message);
    }
    let has = |f: Field| columns.contains(&Column::Field(f));
    let mut missing = Vec::new();
    if !has(Field::CustomerId) {
        missing.push("customerId column");
    }
    if !has(Field::OrderId) && !has(Field::PaymentIntentId) {
        missing.push("orderId (or paymentIntentId) column");
    }
    if !missing.is_empty() {
        let names: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
        return Err(format!(
            "the header has no {} (found: {}); the columns are {}, metadata.KEY",
            missing.join(" and no "),
            headers.join(", "),
            names.join(", ")
        ));
    }
    Ok(())
}
