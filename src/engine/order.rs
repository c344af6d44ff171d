//! Whether a job's origin gives its rows in the same order every time, so
//! that "row N" means the same row on a second read: what a rerun from the
//! failure (and a retry that resumes) needs.

use crate::project::{Job, Project};

/// Ok when the job's origin is ordered: a CSV or JSON file (rows in file
/// order), or a SQL query with an ORDER BY at its top level (which must be on
/// a unique key for "row N" to be one row: tidepool cannot check that). An
/// HTTP origin is not ordered. The error says why not.
pub fn origin_order(project: &Project, job: &Job) -> Result<(), String> {
    let name = &job.origin.connection;
    let Some(conn) = project.connections.get(name) else {
        return Err(format!("the origin's connection {name:?} is not loaded"));
    };
    match conn.kind() {
        "csv" | "json" => Ok(()),
        "http" => Err(format!(
            "the origin {name:?} is an HTTP source: it may give other rows, or the same rows in another order, on a second read"
        )),
        kind => match job.origin.query.as_deref() {
            Some(q) if has_top_level_order_by(q) => Ok(()),
            Some(_) => Err(format!(
                "the origin query of job {} ({kind} connection {name:?}) has no ORDER BY: \
                 its rows may come in another order on a second read (order it by a unique key)",
                job.id
            )),
            None => Err(format!(
                "the origin of job {} ({kind} connection {name:?}) has no query to order",
                job.id
            )),
        },
    }
}

/// Whether `sql` has ORDER BY outside parentheses, quotes and comments.
fn has_top_level_order_by(sql: &str) -> bool {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut depth = 0i32;
    let mut chars = sql.chars().peekable();
    let end_word = |word: &mut String, words: &mut Vec<String>, depth: i32| {
        if !word.is_empty() {
            if depth == 0 {
                words.push(word.to_ascii_lowercase());
            }
            word.clear();
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                end_word(&mut word, &mut words, depth);
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                words.push(String::new());
            }
            '-' if chars.peek() == Some(&'-') => {
                end_word(&mut word, &mut words, depth);
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                end_word(&mut word, &mut words, depth);
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            '(' => {
                end_word(&mut word, &mut words, depth);
                depth += 1;
            }
            ')' => {
                end_word(&mut word, &mut words, depth);
                depth -= 1;
            }
            c if c.is_alphanumeric() || c == '_' => word.push(c),
            _ => end_word(&mut word, &mut words, depth),
        }
    }
    end_word(&mut word, &mut words, depth);
    words.windows(2).any(|w| w[0] == "order" && w[1] == "by")
}

#[cfg(test)]
mod tests {
    use super::has_top_level_order_by as ordered;

    #[test]
    fn only_an_order_by_of_the_whole_query_counts() {
        assert!(ordered("SELECT id, name FROM t ORDER BY id"));
        assert!(ordered("select * from t\norder\n  by id limit 10"));
        assert!(!ordered("SELECT * FROM t"));
        assert!(!ordered("SELECT * FROM (SELECT * FROM t ORDER BY id) AS s"));
        assert!(!ordered("SELECT 'ORDER BY id' AS note FROM t"));
        assert!(!ordered("SELECT * FROM t -- ORDER BY id"));
        assert!(!ordered("SELECT * FROM t /* order by id */"));
        assert!(!ordered(
            "SELECT row_number() OVER (ORDER BY id) AS n FROM t"
        ));
        assert!(!ordered("SELECT \"order\" by_x FROM t"));
    }
}
