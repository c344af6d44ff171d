//! Token templates (`@@ORG:…@@`, `@@VAR:…@@`, `@@STG:n,#Action@@`) and the
//! SQL binding of an origin query's tokens.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tidepool::connector::bind_tokens;
use tidepool::template::{Part, Template, Token};
use tidepool::value::Value;

fuzz_target!(|text: &str| {
    let Ok(template) = Template::parse(text) else {
        return;
    };
    for token in template.tokens() {
        // A token reads back as itself, unless its name ends with `@`
        // (`@@VAR:x@ @@` names `x@`, which prints as `@@VAR:x@@@`).
        if token.to_string().ends_with("@@@") {
            continue;
        }
        let again = Template::parse(&token.to_string()).expect("a token's text parses");
        assert_eq!(again.parts, vec![Part::Token(token.clone())]);
    }
    let variables: BTreeMap<String, Value> = [
        (
            "JobArgument".to_owned(),
            Value::from("x'); DROP TABLE t; --@@"),
        ),
        ("RunID".to_owned(), Value::Int(7)),
    ]
    .into_iter()
    .collect();
    let placeholders: [fn(usize) -> String; 2] = [|_| "?".to_owned(), |n| format!("${n}")];
    for placeholder in placeholders {
        if let Ok((sql, params)) = bind_tokens(text, &variables, placeholder) {
            // Every token became a bound parameter; no token text is left in the SQL.
            let tokens = template.tokens().count();
            assert_eq!(params.len(), tokens);
            assert!(template.tokens().all(|t| matches!(t, Token::Variable(_))));
            assert!(!sql.contains("@@"), "{sql:?}");
        }
    }
});
