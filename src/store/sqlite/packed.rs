//! A run's request and response kept small: zstd against a dictionary made of
//! a typical request and response, so that what every run repeats (the field
//! names, the shape, its runID told twice) costs a few bytes instead of ~700.
//!
//! A packed text is a BLOB: one version byte, then a zstd frame. A TEXT value
//! (written by an older tidepool, or by hand) is read as it is, so stores of
//! every age read the same; SQL reads both through `tp_text(x)`, registered on
//! every connection.

use std::cell::RefCell;
use std::sync::OnceLock;

use rusqlite::functions::FunctionFlags;
use rusqlite::types::{Value, ValueRef};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// The first byte of a packed text: which dictionary it was packed against.
/// A new dictionary takes a new byte; old ones stay readable forever.
const DICT_V1: u8 = 1;

/// A typical request and response (and a log line): what runs repeat.
/// Never change it: values packed against it must keep reading.
const DICTIONARY_V1: &str = concat!(
    r#"{"runID":"00000000-0000-0000-0000-000000000000","projectID":"demo","jobID":"load","chainJobs":false,"loggingLevel":1,"argument":"","beginAtRow":1,"endAfterRow":null,"threadCount":1,"webHookURL":null,"instance":null}"#,
    r#"{"runID":"00000000-0000-0000-0000-000000000000","status":"Failed","startTime":"2026-12-02T07:28:20.2159901+00:00","runTime":"00:00:00.0406473","totalRows":0,"inserts":0,"updates":0,"deletes":0,"errors":1,"skips":0,"ignores":0,"error":"interrupted","returnValue":null,"results":[],"log":[{"time":"2026-12-02T07:28:20.2252469+00:00","level":"Low","jobID":"load","row":null,"message":"job started"}]}"#,
    r#"{"runID":"00000000-0000-0000-0000-000000000000","status":"Complete","startTime":"2026-12-02T07:28:20.2159901+00:00","runTime":"00:00:00.0406473","totalRows":3,"inserts":0,"updates":3,"deletes":0,"errors":0,"skips":0,"ignores":0,"error":null,"returnValue":null,"results":[{"runID":"00000000-0000-0000-0000-000000000000","startTime":"2026-12-02T07:28:20.2252469+00:00","runTime":"00:00:00.0314047","status":"Complete","totalRows":3,"inserts":0,"updates":3,"deletes":0,"errors":0,"skips":0,"ignores":0,"jobID":"load"}],"log":[]}"#,
);

/// zstd's level: 3 packs a run's texts in a few microseconds.
const LEVEL: i32 = 3;

/// The most a packed text may unpack to (a run's response holds at most its
/// capped log; anything claiming more is damaged).
const MAX_UNPACKED: usize = 256 * 1024 * 1024;

fn encoder_dictionary() -> &'static EncoderDictionary<'static> {
    static D: OnceLock<EncoderDictionary<'static>> = OnceLock::new();
    D.get_or_init(|| EncoderDictionary::copy(DICTIONARY_V1.as_bytes(), LEVEL))
}

fn decoder_dictionary() -> &'static DecoderDictionary<'static> {
    static D: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    D.get_or_init(|| DecoderDictionary::copy(DICTIONARY_V1.as_bytes()))
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Why a stored value does not unpack.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PackError {
    /// The first byte names no dictionary this tidepool knows.
    #[error(
        "a packed run text names dictionary {0}, which this tidepool does not know (a newer version wrote it)"
    )]
    UnknownDictionary(u8),
    /// zstd refused the frame.
    #[error("a packed run text does not unpack: {0}")]
    Zstd(#[source] std::io::Error),
    /// It unpacked to something that is not UTF-8.
    #[error("a packed run text is not UTF-8")]
    NotText,
    /// It claims to be bigger than any run text can be.
    #[error("a packed run text claims {0} bytes")]
    TooBig(u64),
}

/// `text` packed: a BLOB for the store. Falls back to the text itself if
/// zstd refuses (it does not, short of memory).
pub(crate) fn pack(text: &str) -> Value {
    let packed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            let mut new = zstd::bulk::Compressor::with_prepared_dictionary(encoder_dictionary())?;
            // Each byte counts: no checksum (SQLite pages have their own
            // integrity) and no dictionary ID (the version byte says it).
            new.include_checksum(false)?;
            new.include_dictid(false)?;
            *c = Some(new);
        }
        let c = c.as_mut().expect("compressor just made");
        let mut out = Vec::with_capacity(text.len() / 2 + 16);
        out.push(DICT_V1);
        out.extend(c.compress(text.as_bytes())?);
        Ok::<_, std::io::Error>(out)
    });
    match packed {
        Ok(p) => Value::Blob(p),
        Err(_) => Value::Text(text.to_owned()),
    }
}

/// The text of a stored value (TEXT as is; a packed BLOB unpacked).
pub(crate) fn unpack(blob: &[u8]) -> Result<String, PackError> {
    let (&version, frame) = blob.split_first().ok_or(PackError::UnknownDictionary(0))?;
    if version != DICT_V1 {
        return Err(PackError::UnknownDictionary(version));
    }
    let size = zstd::zstd_safe::get_frame_content_size(frame)
        .map_err(|_| PackError::Zstd(std::io::Error::other("not a zstd frame")))?
        .unwrap_or(MAX_UNPACKED as u64);
    if size > MAX_UNPACKED as u64 {
        return Err(PackError::TooBig(size));
    }
    let bytes = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::with_prepared_dictionary(
                decoder_dictionary(),
            )?);
        }
        d.as_mut()
            .expect("decompressor just made")
            .decompress(frame, size as usize)
    });
    String::from_utf8(bytes.map_err(PackError::Zstd)?).map_err(|_| PackError::NotText)
}

/// Registers `tp_text(x)` on `conn`: the text of a stored run text, packed
/// or not (NULL stays NULL).
pub(crate) fn register(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function(
        "tp_text",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| match ctx.get_raw(0) {
            ValueRef::Blob(b) => unpack(b)
                .map(Value::Text)
                .map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e))),
            _ => ctx.get::<Value>(0),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpacked(v: &Value) -> String {
        match v {
            Value::Blob(b) => unpack(b).unwrap(),
            other => panic!("not packed: {other:?}"),
        }
    }

    #[test]
    fn a_response_packs_to_a_fraction_and_unpacks_to_the_same_text() {
        let response = r#"{"runID":"7cd83ff5-d9f8-4127-b069-4cd7864203ed","status":"Complete","startTime":"2026-12-02T07:28:20.2159901+00:00","runTime":"00:00:00.0406473","totalRows":3,"inserts":0,"updates":3,"deletes":0,"errors":0,"skips":0,"ignores":0,"error":null,"returnValue":null,"results":[{"runID":"7cd83ff5-d9f8-4127-b069-4cd7864203ed","startTime":"2026-12-02T07:28:20.2252469+00:00","runTime":"00:00:00.0314047","status":"Complete","totalRows":3,"inserts":0,"updates":3,"deletes":0,"errors":0,"skips":0,"ignores":0,"jobID":"load"}],"log":[]}"#;
        let packed = pack(response);
        let Value::Blob(b) = &packed else {
            panic!("not packed")
        };
        assert!(b.len() < 130, "{} bytes packed", b.len());
        assert_eq!(unpacked(&packed), response);
    }

    #[test]
    fn large_and_empty_texts_round_trip() {
        let big = "é log line with a row number 12345\n".repeat(100_000);
        assert_eq!(unpacked(&pack(&big)), big);
        assert_eq!(unpacked(&pack("")), "");
    }

    #[test]
    fn damaged_or_foreign_blobs_are_errors_not_panics() {
        assert!(matches!(unpack(&[]), Err(PackError::UnknownDictionary(0))));
        assert!(matches!(
            unpack(&[9, 1, 2]),
            Err(PackError::UnknownDictionary(9))
        ));
        assert!(unpack(&[DICT_V1, 1, 2, 3]).is_err());
        let Value::Blob(mut b) = pack("some text to damage, long enough to matter") else {
            panic!()
        };
        let n = b.len();
        b[n / 2] ^= 0xff;
        b.truncate(n - 2);
        let _ = unpack(&b); // an error or other text, never a panic
    }

    #[test]
    fn sql_reads_packed_and_plain_texts_alike() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        register(&c).unwrap();
        c.execute_batch("CREATE TABLE t(x)").unwrap();
        c.execute("INSERT INTO t VALUES (?1)", [pack(r#"{"a":"packed"}"#)])
            .unwrap();
        c.execute("INSERT INTO t VALUES ('{\"a\":\"plain\"}'), (NULL)", [])
            .unwrap();
        let got: Vec<Option<String>> = c
            .prepare("SELECT json_extract(tp_text(x), '$.a') FROM t ORDER BY rowid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, [Some("packed".into()), Some("plain".into()), None]);
        c.execute("INSERT INTO t VALUES (x'0900')", []).unwrap();
        let err = c
            .query_row("SELECT tp_text(x) FROM t WHERE rowid = 4", [], |r| {
                r.get::<_, String>(0)
            })
            .unwrap_err();
        assert!(err.to_string().contains("dictionary 9"), "{err}");
    }
}
