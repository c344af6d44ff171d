//! Values between tidepool and MySQL, and quoting names.

use std::fmt::Write as _;

use crate::value::Value;

pub(super) fn quote_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// A qualified, quoted table name from `table` or `db.table`.
pub(super) fn quote_table(t: &str) -> String {
    match t.split_once('.') {
        Some((db, name)) => format!("{}.{}", quote_ident(db), quote_ident(name)),
        None => quote_ident(t),
    }
}

pub(super) fn to_param(v: &Value) -> mysql::Value {
    match v {
        Value::Null => mysql::Value::NULL,
        Value::Bool(b) => mysql::Value::Int(*b as i64),
        Value::Int(i) => mysql::Value::Int(*i),
        Value::Float(f) => mysql::Value::Double(*f),
        Value::Text(s) => mysql::Value::Bytes(s.as_bytes().to_vec()),
    }
}

pub(super) fn from_mysql(v: mysql::Value) -> Value {
    match v {
        mysql::Value::NULL => Value::Null,
        mysql::Value::Bytes(b) => Value::Text(String::from_utf8_lossy(&b).into_owned()),
        mysql::Value::Int(i) => Value::Int(i),
        mysql::Value::UInt(u) => match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Text(u.to_string()),
        },
        mysql::Value::Float(f) => Value::Float(f as f64),
        mysql::Value::Double(f) => Value::Float(f),
        mysql::Value::Date(y, mo, d, h, mi, s, us) => {
            let mut t = format!("{y:04}-{mo:02}-{d:02}");
            if (h, mi, s, us) != (0, 0, 0, 0) {
                let _ = write!(t, " {h:02}:{mi:02}:{s:02}");
                if us > 0 {
                    let _ = write!(t, ".{us:06}");
                }
            }
            Value::Text(t)
        }
        mysql::Value::Time(neg, d, h, mi, s, us) => {
            let hours = d * 24 + h as u32;
            let sign = if neg { "-" } else { "" };
            let mut t = format!("{sign}{hours:02}:{mi:02}:{s:02}");
            if us > 0 {
                let _ = write!(t, ".{us:06}");
            }
            Value::Text(t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::redact_url;

    #[test]
    fn values_convert_both_ways() {
        assert_eq!(
            from_mysql(mysql::Value::Date(2024, 2, 29, 0, 0, 0, 0)),
            Value::from("2024-02-29")
        );
        assert_eq!(
            from_mysql(mysql::Value::Date(2024, 2, 29, 13, 5, 9, 120)),
            Value::from("2024-02-29 13:05:09.000120")
        );
        assert_eq!(
            from_mysql(mysql::Value::Bytes(b"12.50".to_vec())),
            Value::from("12.50")
        );
        assert_eq!(
            from_mysql(mysql::Value::UInt(u64::MAX)),
            Value::from(u64::MAX.to_string())
        );
        assert_eq!(redact_url("mysql://root:pw@h/db"), "mysql://root:***@h/db");
        assert_eq!(quote_table("db.t`x"), "`db`.`t``x`");
    }
}
