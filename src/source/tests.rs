use jiff::Timestamp;

use super::encoding::sniff_delimiter;
use super::*;
use crate::error::Result;

fn now() -> Timestamp {
    "2026-11-24T12:00:00Z".parse().unwrap()
}

fn source(text: &[u8]) -> Result<CsvSource> {
    CsvSource::from_reader(
        "t.csv".into(),
        Box::new(std::io::Cursor::new(text.to_vec())),
    )
}

fn rows(text: &[u8]) -> Vec<ImportRow> {
    let mut s = source(text).unwrap();
    let mut out = Vec::new();
    while let Some(r) = s.next_row(now()).unwrap() {
        out.push(r);
    }
    out
}

#[test]
fn headers_in_either_case_style_and_bom() {
    let out = rows(b"\xEF\xBB\xBFcustomer_id,OrderId,metadata.campaign\r\ncus_1,ord_1,spring\r\n");
    assert_eq!(out.len(), 1);
    let p = out[0].outcome.as_ref().unwrap();
    assert_eq!(
        p.to_json(),
        r#"{"customerId":"cus_1","orderId":"ord_1","metadata":{"campaign":"spring"}}"#
    );
    assert_eq!(out[0].line, 2);
}

#[test]
fn line_numbers_are_right_for_lf_crlf_and_cr_endings() {
    for ending in ["\n", "\r\n", "\r"] {
        let text = [
            "customerId,orderId",
            "cus_1,ord_1",
            "cus_2,ord_2",
            "",
            "cus_3,ord_3",
            "",
        ]
        .join(ending);
        let lines: Vec<u64> = rows(text.as_bytes()).iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 3, 5], "ending {ending:?}");
    }
}

#[test]
fn quoted_newlines_keep_line_numbers_right() {
    let out =
        rows(b"customerId,orderId,metadata\ncus_1,ord_1,\"{\n\"\"a\"\":\"\"b\"\"}\"\ncus_2,,\n");
    assert!(out[0].outcome.is_ok(), "{:?}", out[0].outcome);
    assert_eq!(out[1].line, 4);
    assert!(
        out[1]
            .outcome
            .as_ref()
            .unwrap_err()
            .contains("orderId and paymentIntentId")
    );
}

#[test]
fn header_without_required_columns_is_an_input_error() {
    let err = source(b"name,email\nx,y\n").unwrap_err().to_string();
    assert!(err.contains("t.csv, line 1"), "{err}");
    assert!(err.contains("no customerId column"), "{err}");
    let err = source(b"").unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn bad_rows_do_not_stop_good_ones() {
    let out = rows(b"customerId,orderId\ncus_1,ord_1,extra\ncus_3,ord_3\n");
    assert_eq!(out.len(), 2);
    assert!(
        out[0]
            .outcome
            .as_ref()
            .unwrap_err()
            .contains("3 fields but the header has 2")
    );
    assert!(out[1].outcome.is_ok());
}

#[test]
fn text_that_is_not_utf8_stops_the_file_naming_the_encoding() {
    let bytes = b"customerId,orderId,metadata.ville\ncus_1,ord_1,Paris\ncus_2,ord_2,Orl\xe9ans\n";
    let mut s = source(bytes).unwrap();
    // The file is refused as soon as the bad line is read (rows are read one ahead).
    let err = s.next_row(now()).unwrap_err();
    assert_eq!(err.exit(), crate::Exit::Usage);
    let err = err.to_string();
    assert!(
        err.contains("t.csv, line 3") && err.contains("pass --encoding windows-1252"),
        "{err}"
    );
    // The same bytes read as Windows-1252.
    let opts = CsvOptions {
        delimiter: None,
        encoding: CsvEncoding::Windows1252,
    };
    let mut s = CsvSource::from_reader_with(
        "t.csv".into(),
        Box::new(std::io::Cursor::new(bytes.to_vec())),
        &opts,
    )
    .unwrap();
    s.next_row(now()).unwrap();
    let row = s.next_row(now()).unwrap().unwrap();
    assert_eq!(
        row.outcome.unwrap().metadata.unwrap()["ville"],
        "Orl\u{e9}ans"
    );
    // A file is checked whole before anything is imported.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.csv");
    let mut big = b"customerId,orderId\n".to_vec();
    for i in 0..100_000 {
        big.extend_from_slice(format!("cus_{i},ord_{i}\n").as_bytes());
    }
    big.extend_from_slice(b"cus_\x80,ord_x\n");
    std::fs::write(&path, &big).unwrap();
    let err = check_utf8(&path).unwrap_err().to_string();
    assert!(err.contains("line 100002") && err.contains("0x80"), "{err}");
    // Multi-byte characters cut by the read chunks are fine.
    let text = "customerId,orderId\n".to_owned() + &"cus_é€ç,ord_1\n".repeat(40_000);
    std::fs::write(&path, text).unwrap();
    check_utf8(&path).unwrap();
}

#[test]
fn the_separator_is_found_from_the_header() {
    for (text, sep) in [
        (&b"customerId;orderId\ncus_1;ord_1\n"[..], b';'),
        (
            b"\xEF\xBB\xBF\"Customer ID\"\t\"Order ID\"\ncus_1\tord_1\n",
            b'\t',
        ),
        (b"customerId,orderId\ncus_1,ord_1\n", b','),
        (b"name;email\n", b','),
    ] {
        assert_eq!(
            sniff_delimiter(text),
            sep,
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }
    let out = rows(b"customerId;orderId;metadata.note\ncus_1;ord_1;a,b\n");
    let p = out[0].outcome.as_ref().unwrap();
    assert_eq!(p.metadata.as_ref().unwrap()["note"], "a,b");
}

#[test]
fn an_unclosed_quote_in_an_id_swallows_no_row_silently() {
    let out = rows(b"customerId,orderId\ncus_1,ord_1\ncus_2,\"ord_2\ncus_3,ord_3\n");
    assert_eq!(out.len(), 2);
    assert!(out[0].outcome.is_ok());
    assert_eq!(out[1].line, 3);
    let why = out[1].outcome.as_ref().unwrap_err();
    assert!(
        why.contains("orderId is a quoted field that begins on line 3 and spans 2 lines")
            && why.contains("check for an unclosed quote on line 3"),
        "{why}"
    );
    assert!(!why.contains("control character"), "said once: {why}");
    // The swallowed row is kept with the invalid one (exported for repair).
    assert!(out[1].raw["orderId"].contains("cus_3,ord_3"));
}

#[test]
fn a_stray_quote_in_metadata_that_folds_rows_is_reported() {
    let text = b"customerId,orderId,metadata.note\n\
        cus_1,ord_1,\"oops\n\
        cus_2,ord_2,fine\n\
        cus_3,ord_3,x\"\n\
        cus_4,ord_4,fine\n";
    let out = rows(text);
    assert_eq!(out.len(), 2, "{out:?}");
    let why = out[0].outcome.as_ref().unwrap_err();
    assert!(
        why.contains("metadata.note is a quoted field that begins on line 2 and spans 3 lines")
            && why.contains("look like rows"),
        "{why}"
    );
    // A legitimate multi-line field whose lines do not look like rows is fine.
    let out = rows(b"customerId,orderId,metadata.note\ncus_1,ord_1,\"line one\nline, two\"\n");
    assert!(out[0].outcome.is_ok(), "{:?}", out[0].outcome);
    // Line numbers count the breaks of earlier fields.
    let out = rows(b"customerId,metadata.a,orderId\ncus_1,\"a\nb\",\"ord\n1\"\n");
    let why = out[0].outcome.as_ref().unwrap_err();
    assert!(why.contains("begins on line 3"), "{why}");
}

#[test]
fn two_columns_for_one_field_are_an_error_naming_both() {
    for (header, first, second, field) in [
        (
            "customerId,orderId,orderId",
            "2 (\"orderId\")",
            "3 (\"orderId\")",
            "orderId",
        ),
        (
            "customerId,Order ID,Customer ID",
            "1 (\"customerId\")",
            "3 (\"Customer ID\")",
            "customerId",
        ),
        (
            "customerId,order_id,orderId",
            "2 (\"order_id\")",
            "3 (\"orderId\")",
            "orderId",
        ),
        (
            "customerId,orderId,metadata.a,Metadata.a",
            "3 (\"metadata.a\")",
            "4 (\"Metadata.a\")",
            "metadata.a",
        ),
    ] {
        let text = format!("{header}\ncus_1,ord_1,x,y\n");
        let err = source(text.as_bytes()).unwrap_err();
        assert_eq!(err.exit(), crate::Exit::Usage);
        let err = err.to_string();
        assert!(
            err.contains("t.csv, line 1")
                && err.contains(&format!("columns {first} and {second} both give {field}")),
            "{header}: {err}"
        );
    }
    // Export-only and unknown columns may repeat.
    assert!(source(b"customerId,orderId,error,error,x,x\n").is_ok());
}

#[test]
fn a_quote_left_open_at_the_end_of_the_file_makes_the_last_row_invalid() {
    let out = rows(b"customerId,orderId,metadata.c\ncus_1,ord_1,a\ncus_2,ord_2,\"unterminated");
    assert_eq!(out.len(), 2);
    assert!(out[0].outcome.is_ok());
    let why = out[1].outcome.as_ref().unwrap_err();
    assert!(
        why.contains("check for an unclosed quote on line 3"),
        "{why}"
    );
    assert_eq!(out[1].key.as_deref(), Some("ord_2"));
    assert_eq!(out[1].raw["metadata.c"], "unterminated");
    // Escaped quotes ("") are fine.
    let out = rows(b"customerId,orderId,metadata.c\ncus_1,ord_1,\"say \"\"hi\"\"\"\n");
    assert!(out[0].outcome.is_ok(), "{:?}", out[0].outcome);
}

#[test]
fn export_columns_are_ignored_and_unknown_ones_listed() {
    let s = source(b"customerId,orderId,error,line,state,source,colour\n").unwrap();
    assert_eq!(s.unknown_columns, vec!["colour".to_owned()]);
}
