//! What a SQL statement does, as policy sees it: its kinds and the tables it
//! touches. Produced by the PostgreSQL codec (`proxy::postgres::sql`).
use std::fmt;

use serde::{Deserialize, Serialize};

/// A statement kind, as rules name them (`statements = ["select", ...]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Create,
    Alter,
    Drop,
    Truncate,
    CopyFrom,
    CopyTo,
    CopyProgram,
    Grant,
    Revoke,
    Set,
    Reset,
    Show,
    Transaction,
    Call,
    Do,
    Execute,
    Prepare,
    Explain,
    Listen,
    Notify,
    Vacuum,
    Analyze,
    /// `LOCK TABLE` (pg_dump and pg_restore take locks).
    Lock,
    Other,
}

impl StatementKind {
    const ALL: [StatementKind; 29] = [
        Self::Select,
        Self::Insert,
        Self::Update,
        Self::Delete,
        Self::Merge,
        Self::Create,
        Self::Alter,
        Self::Drop,
        Self::Truncate,
        Self::CopyFrom,
        Self::CopyTo,
        Self::CopyProgram,
        Self::Grant,
        Self::Revoke,
        Self::Set,
        Self::Reset,
        Self::Show,
        Self::Transaction,
        Self::Call,
        Self::Do,
        Self::Execute,
        Self::Prepare,
        Self::Explain,
        Self::Listen,
        Self::Notify,
        Self::Vacuum,
        Self::Analyze,
        Self::Lock,
        Self::Other,
    ];

    /// Kinds that change data or schema (or run arbitrary code).
    pub fn writes(self) -> bool {
        !matches!(
            self,
            Self::Select
                | Self::CopyTo
                | Self::Set
                | Self::Reset
                | Self::Show
                | Self::Transaction
                | Self::Explain
                | Self::Listen
                | Self::Lock
        )
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl StatementKind {
    /// The name rules use (as serde spells it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Select => "select",
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Merge => "merge",
            Self::Create => "create",
            Self::Alter => "alter",
            Self::Drop => "drop",
            Self::Truncate => "truncate",
            Self::CopyFrom => "copy_from",
            Self::CopyTo => "copy_to",
            Self::CopyProgram => "copy_program",
            Self::Grant => "grant",
            Self::Revoke => "revoke",
            Self::Set => "set",
            Self::Reset => "reset",
            Self::Show => "show",
            Self::Transaction => "transaction",
            Self::Call => "call",
            Self::Do => "do",
            Self::Execute => "execute",
            Self::Prepare => "prepare",
            Self::Explain => "explain",
            Self::Listen => "listen",
            Self::Notify => "notify",
            Self::Vacuum => "vacuum",
            Self::Analyze => "analyze",
            Self::Lock => "lock",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for StatementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of kinds, one bit each: rule checks are a mask test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KindSet(u32);

impl KindSet {
    pub fn insert(&mut self, kind: StatementKind) {
        self.0 |= kind.bit();
    }

    pub fn contains(self, kind: StatementKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn is_subset(self, of: KindSet) -> bool {
        self.0 & !of.0 == 0
    }

    pub fn intersects(self, other: KindSet) -> bool {
        self.0 & other.0 != 0
    }

    pub fn iter(self) -> impl Iterator<Item = StatementKind> {
        StatementKind::ALL
            .into_iter()
            .filter(move |k| self.contains(*k))
    }
}

impl FromIterator<StatementKind> for KindSet {
    fn from_iter<I: IntoIterator<Item = StatementKind>>(iter: I) -> Self {
        let mut set = Self::default();
        for kind in iter {
            set.insert(kind);
        }
        set
    }
}

/// Serialised as its display form (`select+delete`), without an
/// intermediate string: it is written once per statement.
impl Serialize for KindSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for KindSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kind) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            f.write_str(kind.as_str())?;
        }
        Ok(())
    }
}

/// One statement of a query, analysed and its names resolved for the
/// session it came in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatementInfo {
    /// The statement's own kind and the kinds of every statement nested in
    /// it (a DELETE in a CTE, the statement under EXPLAIN or PREPARE).
    pub kinds: KindSet,
    /// Every relation it names, as `schema.table`, resolved as the server
    /// will resolve it; a name that could resolve to several (a
    /// search_path of several schemas) is there once per possibility.
    pub tables: Vec<String>,
    /// Every function it calls, resolved the same way.
    pub functions: Vec<FunctionRef>,
    /// False when it cannot be checked (see `problem`); such a statement
    /// is denied unless a rule says `unparsed = "allow"`.
    pub parsed: bool,
    /// Why it cannot be checked.
    pub problem: Option<String>,
    /// Column uses a table-column mask cannot follow (the value would leave
    /// without its table origin).
    pub exposures: Vec<Exposure>,
    /// It changes the session's role (`SET ROLE`, `set_config('role', …)`):
    /// never allowed, since the agent pins the role.
    pub changes_role: bool,
    /// The statement as sent (literals replaced when asked), cut at 4 KiB.
    pub text: String,
}

/// A column use whose value would reach the client (or a table) without
/// the table origin a column mask is applied by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    /// The `schema.table`s the column may belong to; empty: any table of
    /// the statement.
    pub tables: Vec<String>,
    /// None: every column (a whole row, a `*`).
    pub column: Option<String>,
    /// How it leaves, in words ("in an expression").
    pub how: &'static str,
}

/// A function a statement calls, as `schema.name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionRef {
    pub name: String,
    pub builtin: Builtin,
}

/// What the server's catalog says of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// In `pg_catalog`, immutable or stable in every overload.
    Stable,
    /// In `pg_catalog`, volatile in some overload.
    Volatile,
    /// Not a built-in (or not known to be one).
    No,
}

impl StatementInfo {
    pub fn writes(&self) -> bool {
        self.kinds.iter().any(StatementKind::writes)
    }

    /// Whether it cannot change the target: parsed, only `select`, `show`,
    /// `set` and `transaction` statements (nested ones included), and only
    /// functions that need no rule (built-ins the server marks immutable
    /// or stable, less those with side effects). Such a statement may go
    /// upstream before its record is durable; its answer may not reach the
    /// client before (docs/SESSIONS.md, "When a record is durable").
    pub fn reads_only(&self) -> bool {
        use StatementKind as K;
        let reading: KindSet = [K::Select, K::Show, K::Set, K::Transaction]
            .into_iter()
            .collect();
        self.parsed
            && !self.changes_role
            && self.kinds != KindSet::default()
            && self.kinds.is_subset(reading)
            && self
                .functions
                .iter()
                .all(super::functions::allowed_by_default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_configuration_spelling() {
        for kind in StatementKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        let set: KindSet = [StatementKind::Select, StatementKind::Delete]
            .into_iter()
            .collect();
        assert_eq!(set.to_string(), "select+delete");
    }
}
