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

/// Why a template does not parse; the text says which token and how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// An `@@` with no closing `@@`; holds the text from the opening `@@` on.
    #[error("unterminated token {0:?}: a token ends with @@")]
    Unterminated(String),
    /// `@@Name@@`: no `KIND:` before the name; holds the token's inside.
    #[error("token @@{0}@@ has no kind: write @@ORG:Field@@, @@VAR:Name@@ or @@STG:n,#Action@@")]
    NoKind(String),
    /// `@@ORG:@@`: a kind and no name; holds the token's inside.
    #[error("token @@{0}@@ names nothing")]
    NoName(String),
    /// `@@STG:1,#Other@@`: a stage gives only its action.
    #[error("token @@{0}@@: only #Action can be read from a stage")]
    StageProperty(String),
    /// `@@STG:0@@`, `@@STG:x@@`: stages are numbered from 1.
    #[error("token @@{0}@@: the stage number must be a positive integer")]
    StageNumber(String),
    /// A kind other than ORG, VAR or STG.
    #[error("token @@{inner}@@ has unknown kind {kind:?}: use ORG, VAR or STG")]
    UnknownKind {
        /// The token's inside.
        inner: String,
        /// The kind as written, upper-cased.
        kind: String,
    },
}

/// A parsed template: literal text and tokens, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The pieces in order.
    pub parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; an unknown token kind or an unterminated `@@` is an error.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("@@") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("@@")
                .ok_or_else(|| TemplateError::Unterminated(rest[start..].to_owned()))?;
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

fn parse_token(inner: &str) -> Result<Token, TemplateError> {
    let (kind, name) = inner
        .split_once(':')
        .ok_or_else(|| TemplateError::NoKind(inner.to_owned()))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(TemplateError::NoName(inner.to_owned()));
    }
    match kind.trim().to_ascii_uppercase().as_str() {
        "ORG" => Ok(Token::Origin(name.to_owned())),
        "VAR" => Ok(Token::Variable(name.to_owned())),
        "STG" => {
            let (n, what) = name.split_once(',').unwrap_or((name, "#Action"));
            if !what.trim().eq_ignore_ascii_case("#Action") {
                return Err(TemplateError::StageProperty(inner.to_owned()));
            }
            match n.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Token::StageAction(n)),
                _ => Err(TemplateError::StageNumber(inner.to_owned())),
            }
        }
        other => Err(TemplateError::UnknownKind {
            inner: inner.to_owned(),
            kind: other.to_owned(),
        }),
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
        assert_eq!(
            Template::parse("a @@ORG:x").unwrap_err().to_string(),
            r#"unterminated token "@@ORG:x": a token ends with @@"#
        );
        assert_eq!(
            Template::parse("@@foo:x@@").unwrap_err().to_string(),
            r#"token @@foo:x@@ has unknown kind "FOO": use ORG, VAR or STG"#
        );
        assert_eq!(
            Template::parse("@@STG:0,#Action@@").unwrap_err(),
            TemplateError::StageNumber("STG:0,#Action".into())
        );
        assert_eq!(
            Template::parse("@@STG:1,#Values@@")
                .unwrap_err()
                .to_string(),
            "token @@STG:1,#Values@@: only #Action can be read from a stage"
        );
        assert_eq!(
            Template::parse("@@ORG@@").unwrap_err().to_string(),
            "token @@ORG@@ has no kind: write @@ORG:Field@@, @@VAR:Name@@ or @@STG:n,#Action@@"
        );
        assert_eq!(
            Template::parse("@@ORG: @@").unwrap_err().to_string(),
            "token @@ORG: @@ names nothing"
        );
    }
}
