//! Token templates: `Dear @@ORG:FirstName@@`, `@@VAR:JobArgument@@`, `@@STG:1,#Action@@`.

use std::fmt;

/// One token inside a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `@@ORG:Field@@`: the origin row's value of `Field`.
    Origin(String),
    /// `@@VAR:Name@@`: a variable (`JobArgument`, `RunID`, project variables).
    Variable(String),
    /// `@@STG:n,#Action@@`: what stage `n` (1-based) did to this row.
    StageAction(usize),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Origin(n) => write!(f, "@@ORG:{n}@@"),
            Token::Variable(n) => write!(f, "@@VAR:{n}@@"),
            Token::StageAction(n) => write!(f, "@@STG:{n},#Action@@"),
        }
    }
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as it is.
    Literal(String),
    /// A token replaced by its value.
    Token(Token),
}

/// A parsed template: literal text and tokens, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The pieces in order.
    pub parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; an unknown token kind or an unterminated `@@` is an error.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("@@") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("@@").ok_or_else(|| {
                format!(
                    "unterminated token {:?}: a token ends with @@",
                    &rest[start..]
                )
            })?;
            parts.push(Part::Token(parse_token(&after[..end])?));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The tokens of the template, in order.
    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.parts.iter().filter_map(|p| match p {
            Part::Token(t) => Some(t),
            Part::Literal(_) => None,
        })
    }
}

fn parse_token(inner: &str) -> Result<Token, String> {
    let (kind, name) = inner.split_once(':').ok_or_else(|| {
        format!(
            "token @@{inner}@@ has no kind: write @@ORG:Field@@, @@VAR:Name@@ or @@STG:n,#Action@@"
        )
    })?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("token @@{inner}@@ names nothing"));
    }
    match kind.trim().to_ascii_uppercase().as_str() {
        "ORG" => Ok(Token::Origin(name.to_owned())),
        "VAR" => Ok(Token::Variable(name.to_owned())),
        "STG" => {
            let (n, what) = name.split_once(',').unwrap_or((name, "#Action"));
            if !what.trim().eq_ignore_ascii_case("#Action") {
                return Err(format!(
                    "token @@{inner}@@: only #Action can be read from a stage"
                ));
            }
            match n.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Token::StageAction(n)),
                _ => Err(format!(
                    "token @@{inner}@@: the stage number must be a positive integer"
                )),
            }
        }
        other => Err(format!(
            "token @@{inner}@@ has unknown kind {other:?}: use ORG, VAR or STG"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_literals_and_tokens() {
        let t = Template::parse("Hi @@ORG:First Name@@, arg=@@var:JobArgument@@!").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Literal("Hi ".into()),
                Part::Token(Token::Origin("First Name".into())),
                Part::Literal(", arg=".into()),
                Part::Token(Token::Variable("JobArgument".into())),
                Part::Literal("!".into()),
            ]
        );
        assert_eq!(
            Template::parse("@@STG:2,#Action@@").unwrap().parts,
            vec![Part::Token(Token::StageAction(2))]
        );
    }

    #[test]
    fn rejects_bad_tokens() {
        assert!(
            Template::parse("@@ORG:x")
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            Template::parse("@@FOO:x@@")
                .unwrap_err()
                .contains("unknown kind")
        );
        assert!(Template::parse("@@STG:0,#Action@@").is_err());
        assert!(Template::parse("@@ORG@@").is_err());
    }
}
