//! Masks: which values in a SQL result a workload must not see, and what it
//! sees instead. Pure data; the PostgreSQL proxy applies them row by row
//! (`proxy::postgres::mask`).
use std::fmt;

use serde::Deserialize;

/// One mask of a rule or target.
#[derive(Clone, Debug)]
pub struct Mask {
    pub selects: MaskSelects,
    pub strategy: Strategy,
    /// `mask_expressions = "allow"` on its rule: statements may use the
    /// column where the mask cannot follow it (the value leaves unmasked).
    pub expressions_allowed: bool,
}

impl MaskSelects {
    /// Whether it selects values by what they look like (a pattern or a
    /// regular expression), which applies to any text, not by column.
    pub fn is_free_text(&self) -> bool {
        matches!(self, MaskSelects::Pattern(_) | MaskSelects::Regex(_))
    }
}

/// The first column mask `statement` would walk around, in words: a
/// masked column used where the server reports no table origin for the
/// value (an expression, a set operation, a whole row, a subquery's
/// output, RETURNING, a write), so the mask could not apply.
pub fn walked_around(masks: &[&Mask], statement: &super::StatementInfo) -> Option<String> {
    for exposure in &statement.exposures {
        for mask in masks.iter().filter(|m| !m.expressions_allowed) {
            let MaskSelects::Column(name) = &mask.selects else {
                continue;
            };
            let column = exposure
                .column
                .as_ref()
                .is_none_or(|c| c.eq_ignore_ascii_case(&name.column));
            let tables = if exposure.tables.is_empty() {
                &statement.tables
            } else {
                &exposure.tables
            };
            let table = name.table.as_ref().is_none_or(|table| {
                tables.iter().any(|qualified| {
                    let (schema, relation) = qualified.split_once('.').unwrap_or(("", qualified));
                    relation.eq_ignore_ascii_case(table)
                        && name
                            .schema
                            .as_ref()
                            .is_none_or(|s| s.eq_ignore_ascii_case(schema))
                })
            });
            if column && table {
                return Some(format!(
                    "column {name} is masked for this workload, and this statement would return it unmasked ({}); select it as a plain column of a plain SELECT, or allow it with mask_expressions = \"allow\" on the rule",
                    exposure.how
                ));
            }
        }
    }
    None
}

/// What a mask applies to.
#[derive(Clone, Debug)]
pub enum MaskSelects {
    /// A column: `column` (any result column of that name), `table.column`
    /// (that table in any schema) or `schema.table.column`. Names compare
    /// case-insensitively: masking too much is safe, too little is not.
    Column(ColumnName),
    /// Values anywhere in a result that look like one of the built-in kinds.
    Pattern(BuiltinPattern),
    /// Values anywhere in a result that match this regular expression.
    Regex(Box<regex::bytes::Regex>),
    /// Values in an HTTP target's JSON answers: of a key anywhere, or at
    /// a path from the root (`$.items[*].token`).
    Json(crate::masking::json::Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ColumnName {
    pub schema: Option<String>,
    pub table: Option<String>,
    pub column: String,
}

impl ColumnName {
    /// Parses `column`, `table.column` or `schema.table.column`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<String> = text.split('.').map(str::to_ascii_lowercase).collect();
        if parts.iter().any(String::is_empty) || parts.len() > 3 {
            return Err(format!(
                "{text:?} is not `column`, `table.column` or `schema.table.column`"
            ));
        }
        let mut parts = parts.into_iter().rev();
        let column = parts.next().expect("split yields one part");
        let table = parts.next();
        let schema = parts.next();
        Ok(Self {
            schema,
            table,
            column,
        })
    }

    /// Whether the name needs the catalog (it names a table), as opposed to
    /// matching a result column's own name.
    pub fn is_qualified(&self) -> bool {
        self.table.is_some()
    }
}

impl fmt::Display for ColumnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in [&self.schema, &self.table].into_iter().flatten() {
            write!(f, "{part}.")?;
        }
        f.write_str(&self.column)
    }
}

/// Value shapes the agent recognises without a custom regex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinPattern {
    Email,
    /// 13 to 19 digits (spaces or dashes between), passing the Luhn check.
    CardNumber,
    /// An IBAN passing its mod-97 check.
    Iban,
    /// A JSON Web Token (three base64url parts, the first two JSON).
    Jwt,
    /// Well-known API key formats: AWS access key ids, GitHub, GitLab,
    /// Slack, Stripe and Google API tokens.
    ApiKey,
}

/// What a masked value becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// `****`.
    Redact,
    /// `****` and the last `keep` characters (a value no longer than `keep`
    /// is redacted whole).
    Partial { keep: usize },
    /// A keyed HMAC-SHA256 of the value (32 hex digits): stable for a key,
    /// so equal values still join and group.
    Hash,
    /// SQL NULL.
    Null,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    Redact,
    Partial,
    Hash,
    Null,
}

/// A `mask = [...]` entry as written in a file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSpec {
    pub column: Option<String>,
    pub pattern: Option<BuiltinPattern>,
    pub regex: Option<String>,
    pub json: Option<String>,
    #[serde(default = "default_strategy")]
    pub strategy: StrategyName,
    pub keep: Option<usize>,
}

fn default_strategy() -> StrategyName {
    StrategyName::Redact
}

impl MaskSpec {
    pub fn compile(&self) -> Result<Mask, String> {
        let selects = match (&self.column, self.pattern, &self.regex, &self.json) {
            (Some(column), None, None, None) => MaskSelects::Column(ColumnName::parse(column)?),
            (None, Some(pattern), None, None) => MaskSelects::Pattern(pattern),
            (None, None, Some(regex), None) => MaskSelects::Regex(Box::new(
                regex::bytes::Regex::new(regex).map_err(|e| format!("regex {regex:?}: {e}"))?,
            )),
            (None, None, None, Some(json)) => {
                // A JSON value is replaced as it streams, never held: what
                // needs the value (hash, partial) cannot apply.
                if !matches!(self.strategy, StrategyName::Redact | StrategyName::Null) {
                    return Err(
                        "a json mask redacts or nulls (strategy = \"redact\" or \"null\")".into(),
                    );
                }
                MaskSelects::Json(crate::masking::json::Selector::parse(json)?)
            }
            _ => return Err("a mask names exactly one of column, pattern, regex or json".into()),
        };
        let strategy = match (self.strategy, self.keep) {
            (StrategyName::Partial, keep) => Strategy::Partial {
                keep: keep.unwrap_or(4),
            },
            (_, Some(_)) => return Err("keep applies to strategy = \"partial\"".into()),
            (StrategyName::Redact, None) => Strategy::Redact,
            (StrategyName::Hash, None) => Strategy::Hash,
            (StrategyName::Null, None) => Strategy::Null,
        };
        Ok(Mask {
            selects,
            strategy,
            expressions_allowed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> MaskSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn column_names_parse_at_three_depths() {
        let c = ColumnName::parse("Email").unwrap();
        assert_eq!(
            (c.schema, c.table, c.column.as_str()),
            (None, None, "email")
        );
        let c = ColumnName::parse("customers.email").unwrap();
        assert!(c.is_qualified());
        assert_eq!(c.to_string(), "customers.email");
        let c = ColumnName::parse("sales.customers.email").unwrap();
        assert_eq!(c.schema.as_deref(), Some("sales"));
        for bad in ["", "a..b", "a.b.c.d", ".x"] {
            assert!(ColumnName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn specs_compile_or_say_why_not() {
        let m = spec(r#"column = "customers.email""#).compile().unwrap();
        assert_eq!(m.strategy, Strategy::Redact);
        let m = spec(
            r#"pattern = "card_number"
strategy = "partial"
keep = 4"#,
        )
        .compile()
        .unwrap();
        assert!(matches!(
            m.selects,
            MaskSelects::Pattern(BuiltinPattern::CardNumber)
        ));
        assert_eq!(m.strategy, Strategy::Partial { keep: 4 });
        assert!(spec(r#"regex = "ORD-[0-9]+""#).compile().is_ok());

        let both = spec(
            r#"column = "a"
pattern = "email""#,
        );
        assert!(both.compile().unwrap_err().contains("exactly one"));
        assert!(
            spec(r#"regex = "(""#)
                .compile()
                .unwrap_err()
                .contains("regex")
        );
        let keep = spec(
            r#"column = "a"
keep = 2"#,
        );
        assert!(keep.compile().unwrap_err().contains("keep"));
        assert!(toml::from_str::<MaskSpec>(r#"pattern = "ssn""#).is_err());
    }
}
