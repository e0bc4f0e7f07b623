//! Bad input never crashes and never loses a row (issue 3, item 9): property tests
//! for CSV and API response parsing, and a table of malformed CSV files.

use std::io::Cursor;

use jiff::Timestamp;
use kohort_batch::api::wire;
use kohort_batch::source::{CsvSource, ImportRow};
use proptest::prelude::*;

fn now() -> Timestamp {
    "2026-11-24T12:00:00Z".parse().unwrap()
}

fn read_all(bytes: &[u8]) -> Result<Vec<ImportRow>, String> {
    let mut src = CsvSource::from_reader("in.csv".into(), Box::new(Cursor::new(bytes.to_vec())))
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    while let Some(r) = src.next_row(now()).map_err(|e| e.to_string())? {
        rows.push(r);
    }
    Ok(rows)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_after_a_good_header_parse_without_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut input = b"customerId,orderId,expiresAt,metadata\n".to_vec();
        input.extend_from_slice(&body);
        // Any rows, or a file refused whole because it is not UTF-8.
        let rows = match read_all(&input) {
            Ok(rows) => rows,
            Err(e) => {
                prop_assert!(e.contains("not valid UTF-8") && e.contains("--encoding"), "{}", e);
                Vec::new()
            }
        };
        for r in rows {
            prop_assert!(r.line >= 2);
            if let Err(reason) = &r.outcome { prop_assert!(!reason.is_empty()); }
        }
    }

    #[test]
    fn any_bytes_as_a_whole_file_never_panic(input in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = read_all(&input);
    }

    #[test]
    fn structured_rows_are_never_lost(cells in proptest::collection::vec(("[a-z0-9_ ,\"\\n]{0,12}", "[a-z0-9_]{0,8}", ".{0,30}"), 1..30)) {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["customerId", "orderId", "metadata"]).unwrap();
        for (c, o, m) in &cells { w.write_record([c, o, m]).unwrap(); }
        let bytes = w.into_inner().unwrap();
        let rows = read_all(&bytes).unwrap();
        // Every written record comes back, valid or with a reason, but the ones whose
        // every field is blank (skipped and counted as empty lines).
        let blank = |t: &str| t.bytes().all(|b| b.is_ascii_whitespace());
        let empty = cells.iter().filter(|(c, o, m)| blank(c) && blank(o) && blank(m)).count();
        prop_assert_eq!(rows.len(), cells.len() - empty);
    }

    #[test]
    fn api_bodies_of_any_shape_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), status in 100u16..600) {
        let _ = wire::parse_group(&body);
        let _ = wire::parse_group_lookup(&body);
        let _ = wire::parse_order_group(&body);
        let text = wire::describe_error(status, &body);
        let prefix = format!("HTTP {}", status);
        prop_assert!(text.starts_with(&prefix));
    }

    #[test]
    fn json_values_of_any_shape_never_panic(v in arb_json()) {
        let body = v.to_string();
        let _ = wire::parse_group(body.as_bytes());
        let _ = wire::parse_order_group(body.as_bytes());
        let _ = wire::describe_error(400, format!("{{\"error\":{{\"message\":{body}}}}}").as_bytes());
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        ".{0,10}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("id".to_owned()),
                    Just("share_id".to_owned()),
                    Just("payment_group_id".to_owned()),
                    "[a-z]{1,6}".prop_map(|s| s)
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Expected outcome of one data row: its line and `None` (valid) or a phrase of its reason.
type Want = &'static [(u64, Option<&'static str>)];

#[test]
fn malformed_csv_table() {
    let big = "x".repeat(1_000_000);
    let big_row = format!("customerId,orderId,metadata.note\ncus_1,ord_1,{big}\ncus_2,ord_2,y\n");
    let cases: Vec<(&str, Vec<u8>, Result<Want, &str>)> = vec![
        (
            "non-UTF-8 bytes",
            b"customerId,orderId\ncus_1,ord_1\ncus_\xff\xfe,ord_2\ncus_3,ord_3\n".to_vec(),
            Err("in.csv, line 3: not valid UTF-8 (byte 0xFF): this looks like Windows-1252"),
        ),
        (
            "wrong column counts",
            b"customerId,orderId,metadata\ncus_1,ord_1\ncus_2,ord_2,{},extra\ncus_3,ord_3,{}\n".to_vec(),
            Ok(&[(2, Some("2 fields but the header has 3")), (3, Some("4 fields but the header has 3")), (4, None)]),
        ),
        (
            "header without required columns",
            b"customer,order\ncus_1,ord_1\n".to_vec(),
            Err("in.csv, line 1: the header has no customerId column and no orderId (or paymentIntentId) column"),
        ),
        ("empty file", Vec::new(), Err("in.csv, line 1: the file is empty")),
        ("header only", b"customerId,orderId\r\n".to_vec(), Ok(&[])),
        (
            "a 1 MB field",
            big_row.into_bytes(),
            Ok(&[(2, Some("over the limit of 64 KiB")), (3, None)]),
        ),
        (
            "metadata not an object",
            b"customerId,orderId,metadata\ncus_1,ord_1,\"\"\"text\"\"\"\ncus_2,ord_2,\"{\"\"a\"\":1}\"\n".to_vec(),
            Ok(&[(2, Some("metadata must be a JSON object")), (3, None)]),
        ),
        (
            "dates out of the window",
            b"customerId,orderId,expiresAt\ncus_1,ord_1,2026-11-24T12:01:00Z\ncus_2,ord_2,2027-06-01T00:00:00Z\ncus_3,ord_3,2026-12-24T00:00:00Z\n".to_vec(),
            Ok(&[(2, Some("outside the allowed window")), (3, Some("outside the allowed window")), (4, None)]),
        ),
        (
            "an unclosed quote that swallows the next row is reported, not sent",
            b"customerId,orderId\ncus_1,ord_1\ncus_2,\"ord_2\ncus_3,ord_3\n".to_vec(),
            Ok(&[(2, None), (3, Some("check for an unclosed quote on line 3"))]),
        ),
    ];
    for (name, input, want) in cases {
        match (read_all(&input), want) {
            (Ok(rows), Ok(want)) => {
                let got: Vec<(u64, Option<String>)> = rows
                    .iter()
                    .map(|r| (r.line, r.outcome.as_ref().err().cloned()))
                    .collect();
                assert_eq!(got.len(), want.len(), "{name}: {got:?}");
                for ((line, reason), (wline, wphrase)) in got.iter().zip(want.iter()) {
                    assert_eq!(line, wline, "{name}: {got:?}");
                    match (reason, wphrase) {
                        (None, None) => {}
                        (Some(r), Some(p)) => assert!(r.contains(p), "{name}: {r:?} lacks {p:?}"),
                        _ => panic!("{name}: line {line}: got {reason:?}, want {wphrase:?}"),
                    }
                }
            }
            (Err(e), Err(phrase)) => assert!(e.contains(phrase), "{name}: {e}"),
            (got, want) => panic!("{name}: got {:?}, want {want:?}", got.map(|r| r.len())),
        }
    }
}
