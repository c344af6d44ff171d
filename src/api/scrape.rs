//! `/metrics` for a caller who may read some instances only: the Prometheus
//! text keeps the samples labelled with one of those instances, and the
//! `# HELP`/`# TYPE` lines of the families that keep a sample.

use std::collections::BTreeSet;

/// The exposition `text` with only the samples whose `instance` label is in
/// `allowed`; samples without one (server-wide series) are dropped.
pub fn only_instances(text: &str, allowed: &BTreeSet<String>) -> String {
    let mut out = String::with_capacity(text.len() / 2);
    // The comment lines of the family being read, written once a sample of
    // it is kept.
    let mut pending: Vec<&str> = Vec::new();
    let mut pending_family: Option<&str> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            let family = match words.next() {
                Some("HELP" | "TYPE") => words.next(),
                _ => None,
            };
            if family.is_some() && family != pending_family {
                pending.clear();
                pending_family = family;
            }
            pending.push(line);
            continue;
        }
        let keep = label_value(line, "instance").is_some_and(|i| allowed.contains(&i));
        if keep {
            for c in pending.drain(..) {
                out.push_str(c);
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The value of label `name` in a sample line `metric{a="x",b="y"} 1`
/// (escapes `\\`, `\"`, `\n` undone); `None` when it has no such label or the
/// label set does not parse.
pub fn label_value(line: &str, name: &str) -> Option<String> {
    let open = line.find(['{', ' '])?;
    if line.as_bytes()[open] != b'{' {
        return None;
    }
    let mut rest = &line[open + 1..];
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.starts_with('}') {
            return None;
        }
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        if key.trim() == name {
            return Some(value);
        }
        rest = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE tidepool_runs_total counter
tidepool_runs_total{instance="acme",status="Complete"} 3
tidepool_runs_total{instance="globex",status="Complete"} 5
tidepool_runs_total{instance="ac\"me",status="Failed"} 1

# TYPE tidepool_queue_depth gauge
tidepool_queue_depth 7

# HELP tidepool_webhook_attempts_total Webhook attempts.
# TYPE tidepool_webhook_attempts_total counter
tidepool_webhook_attempts_total{instance="globex",outcome="refused"} 2

# TYPE tidepool_http_request_duration_seconds summary
tidepool_http_request_duration_seconds{route="Results",quantile="0.5"} 0.001
tidepool_http_request_duration_seconds_sum{route="Results"} 0.01
tidepool_http_request_duration_seconds_count{route="Results"} 10
"#;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keeps_only_the_allowed_instances_and_their_families() {
        let acme = only_instances(TEXT, &set(&["acme"]));
        assert_eq!(
            acme,
            "# TYPE tidepool_runs_total counter\n\
             tidepool_runs_total{instance=\"acme\",status=\"Complete\"} 3\n"
        );
        let globex = only_instances(TEXT, &set(&["globex"]));
        assert!(globex.contains("instance=\"globex\",status"), "{globex}");
        assert!(
            globex.contains("# HELP tidepool_webhook_attempts_total Webhook attempts.\n# TYPE tidepool_webhook_attempts_total counter\ntidepool_webhook_attempts_total{instance=\"globex\""),
            "{globex}"
        );
        assert!(!globex.contains("acme"), "{globex}");
        assert!(!globex.contains("queue_depth"), "{globex}");
        assert!(!globex.contains("http_request"), "{globex}");
        // An escaped quote is part of the value, not its end.
        let quoted = only_instances(TEXT, &set(&["ac\"me"]));
        assert!(quoted.contains("status=\"Failed\""), "{quoted}");
        assert!(!quoted.contains("Complete"), "{quoted}");
        assert_eq!(only_instances(TEXT, &set(&["nobody"])), "");
    }

    #[test]
    fn label_values_parse_or_are_none() {
        let line = r#"m{a="x,y}",instance="a\\b\nc",z="1"} 2"#;
        assert_eq!(label_value(line, "a").as_deref(), Some("x,y}"));
        assert_eq!(label_value(line, "instance").as_deref(), Some("a\\b\nc"));
        assert_eq!(label_value(line, "z").as_deref(), Some("1"));
        assert_eq!(label_value(line, "q"), None);
        assert_eq!(label_value("m 1", "instance"), None);
        assert_eq!(label_value("m{instance=\"open 1", "instance"), None);
        assert_eq!(label_value("m{instance=acme} 1", "instance"), None);
        assert_eq!(label_value("", "instance"), None);
    }
}
