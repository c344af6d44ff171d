//! Values between tidepool and PostgreSQL: reading cells, quoting names,
//! COPY's text format.

use std::io::Write as _;

use postgres::types::Type;

use crate::value::Value;

pub(super) fn native(t: &Type) -> bool {
    matches!(
        *t,
        Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::BOOL
            | Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
    )
}

pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub(super) fn cell(row: &postgres::Row, i: usize) -> Result<Value, postgres::Error> {
    let t = row.columns()[i].type_().clone();
    Ok(match t {
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v as i64)),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v as i64)),
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Value::Float(v as f64)),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Float),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
        _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
    }
    .unwrap_or(Value::Null))
}

/// Appends `v` in COPY's text format; blank text is NULL where `blank_is_null`.
pub(super) fn copy_value(out: &mut Vec<u8>, v: &Value, blank_is_null: bool) {
    if blank_is_null && matches!(v, Value::Text(s) if s.trim().is_empty()) {
        out.extend_from_slice(b"\\N");
        return;
    }
    copy_text(out, v);
}

/// Appends `v` in COPY's text format.
pub(super) fn copy_text(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"\\N"),
        Value::Text(s) => {
            for b in s.bytes() {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    _ => out.push(b),
                }
            }
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::redact_url;

    #[test]
    fn copy_text_escapes_and_nulls() {
        let mut b = Vec::new();
        copy_text(&mut b, &Value::from("a\tb\\c\nd"));
        b.push(b'|');
        copy_text(&mut b, &Value::Null);
        b.push(b'|');
        copy_text(&mut b, &Value::Float(0.1));
        assert_eq!(String::from_utf8(b).unwrap(), "a\\tb\\\\c\\nd|\\N|0.1");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
