//! SSH command lines read as the remote shell reads them.
//!
//! A line is parsed with `brush-parser` (the parser of the brush shell: the
//! POSIX grammar with bash's extensions), and every simple command the shell
//! would run is listed: across `;`, `&&`, `||`, pipelines, subshells,
//! groups, loops, conditionals and functions, inside `$(…)`, backquotes and
//! process substitutions, inside the script given to `sh -c` (and the other
//! shells), and the command a wrapper runs (`env`, `sudo`, `nice`, `nohup`,
//! `timeout`, `xargs`, `exec`, `find -exec`, …). What cannot be known before
//! it runs is listed apart, with why: an allow rule never covers it.
use std::fmt;

use brush_parser::{
    ParserOptions, ast,
    word::{self, WordPiece, WordPieceWithSource},
};

/// Lines (and nested scripts) longer than this are not parsed.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// `sh -c "$(… sh -c '…')"`: nesting deeper than this is not followed.
const MAX_DEPTH: usize = 8;
/// Grammar structures (brackets, substitutions, keywords) in one line: the
/// parser recurses on them, so an adversarial line must not drive it deep.
const MAX_STRUCTURES: usize = 256;
/// Opening parentheses in one line: brush-parser 0.4 backtracks over
/// unbalanced ones after `((` in time that doubles with each (16 take
/// 8 ms, 40 take hours); 12 take half a millisecond.
const MAX_PARENTHESES: usize = 12;
/// Here-document operators (`<<`) in one line: brush-parser 0.4 took 4 GB
/// for a 39-byte line with 30 of them (found by fuzzing).
const MAX_HEREDOCS: usize = 4;

/// A command line, as the commands it would run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    /// Every simple command, in the order they appear.
    pub commands: Vec<Command>,
    /// Parts whose effect cannot be known before they run.
    pub unknown: Vec<Unknown>,
}

/// One simple command: its words after quote removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub words: Vec<Word>,
    /// The command that runs this one (`sudo` for `sudo rm`, `sh` for the
    /// commands of `sh -c '…'`): a pattern that covers all of that one's
    /// words covers this one too.
    pub run_by: Option<usize>,
    /// It only runs the commands found in it, which are decided on their
    /// own: a shell given a script (`sh -c '…'`), `nohup`, `nice`,
    /// `timeout`, `exec`, `xargs`… An allow rule need not name it. Not so
    /// for what changes who runs, or in which environment or root (`sudo`,
    /// `su`, `env`, `chroot`): those are commands of their own.
    pub transparent: bool,
}

/// A word as far as it is known before the line runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Word {
    /// Its value, quotes removed.
    Static(String),
    /// An expansion (`$VAR`, `$(…)`, `~`, `*.log`): only its text is known.
    /// `splits`: unquoted, so it may become any number of words.
    Dynamic { text: String, splits: bool },
}

/// A part of the line an allow rule cannot vouch for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unknown {
    pub text: String,
    pub why: String,
}

impl CommandLine {
    pub fn parse(line: &str) -> Self {
        let mut reader = Reader::default();
        reader.script(line, None, 0);
        reader.line
    }

    /// A line that could not be read at all: nothing in it can be allowed.
    pub fn unreadable(line: &str) -> Self {
        let mut reader = Reader::default();
        reader.unknown(line, "the shell parser failed on it");
        reader.line
    }

    /// The words of a rule's pattern, written as one simple command. Globs
    /// stay text: `*` in a pattern is the pattern's, not the shell's.
    pub fn pattern_words(text: &str) -> Result<Vec<Word>, String> {
        let mut reader = Reader {
            globs_are_text: true,
            ..Reader::default()
        };
        reader.script(text, None, 0);
        let CommandLine { commands, unknown } = reader.line;
        if let Some(unknown) = unknown.first() {
            return Err(format!("{:?}: {}", unknown.text, unknown.why));
        }
        // A wrapper pattern (`sudo systemctl …`) reads as the wrapper and
        // what it runs; the first command is the whole pattern.
        match commands.split_first() {
            Some((first, rest)) if rest.iter().all(|c| c.run_by.is_some()) => {
                Ok(first.words.clone())
            }
            _ => Err(format!("{text:?} is not one command")),
        }
    }
}

impl Word {
    pub fn as_static(&self) -> Option<&str> {
        match self {
            Word::Static(s) => Some(s),
            Word::Dynamic { .. } => None,
        }
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Word::Static(s) if needs_quotes(s) => write!(f, "'{}'", s.replace('\'', r"'\''")),
            Word::Static(s) => f.write_str(s),
            Word::Dynamic { text, .. } => f.write_str(text),
        }
    }
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:@%+,{}".contains(c))
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, word) in self.words.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{word}")?;
        }
        Ok(())
    }
}

/// The base name of a command word: `/usr/bin/sudo` runs `sudo`.
pub fn base_name(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

#[derive(Default)]
struct Reader {
    line: CommandLine,
    options: ParserOptions,
    globs_are_text: bool,
}

impl Reader {
    fn unknown(&mut self, text: &str, why: impl Into<String>) {
        let mut text = text.trim().to_owned();
        if text.len() > 200 {
            let mut cut = 200;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        self.line.unknown.push(Unknown {
            text,
            why: why.into(),
        });
    }

    /// A whole script (the line, `sh -c`'s argument, a substitution).
    fn script(&mut self, text: &str, run_by: Option<usize>, depth: usize) {
        if depth > MAX_DEPTH {
            return self.unknown(text, format!("nested more than {MAX_DEPTH} levels deep"));
        }
        if text.len() > MAX_LINE_BYTES {
            return self.unknown(text, format!("longer than {MAX_LINE_BYTES} bytes"));
        }
        if structures(text) > MAX_STRUCTURES {
            return self.unknown(
                text,
                format!("more than {MAX_STRUCTURES} nested structures to follow"),
            );
        }
        if text.bytes().filter(|b| *b == b'(').count() > MAX_PARENTHESES {
            return self.unknown(
                text,
                format!(
                    "more than {MAX_PARENTHESES} parentheses (the parser's time doubles with each)"
                ),
            );
        }
        if text.matches("<<").count() > MAX_HEREDOCS {
            return self.unknown(
                text,
                format!("more than {MAX_HEREDOCS} here-documents (`<<`)"),
            );
        }
        if text.contains("<<") && text.bytes().any(|b| b < 0x20 && b != b'\t' && b != b'\n') {
            // brush-parser 0.4 reads a tag starting with one as empty and
            // took over 4 GB on a 12-byte line (found by fuzzing).
            return self.unknown(
                text,
                "a here-document (`<<`) in a line with control characters",
            );
        }
        if let Some(why) = odd_here_document(text) {
            return self.unknown(text, why);
        }
        if let Some(why) = parser_trap(text) {
            return self.unknown(text, why);
        }
        let parsed =
            guarded(|| brush_parser::Parser::new(text.as_bytes(), &self.options).parse_program());
        match parsed {
            Some(Ok(program)) => {
                for list in &program.complete_commands {
                    self.list(list, run_by, depth);
                }
            }
            Some(Err(error)) => self.unknown(text, format!("the shell cannot parse it ({error})")),
            None => self.unknown(text, "the shell parser failed on it"),
        }
    }

    fn list(&mut self, list: &ast::CompoundList, run_by: Option<usize>, depth: usize) {
        for ast::CompoundListItem(and_or, _) in &list.0 {
            self.pipeline(&and_or.first, run_by, depth);
            for next in &and_or.additional {
                let (ast::AndOr::And(p) | ast::AndOr::Or(p)) = next;
                self.pipeline(p, run_by, depth);
            }
        }
    }

    fn pipeline(&mut self, pipeline: &ast::Pipeline, run_by: Option<usize>, depth: usize) {
        for command in &pipeline.seq {
            self.command(command, run_by, depth);
        }
    }

    fn command(&mut self, command: &ast::Command, run_by: Option<usize>, depth: usize) {
        match command {
            ast::Command::Simple(simple) => self.simple(simple, run_by, depth),
            ast::Command::Compound(compound, redirects) => {
                self.compound(compound, run_by, depth);
                self.redirects(redirects.as_ref(), run_by, depth);
            }
            ast::Command::Function(function) => {
                self.compound(&function.body.0, run_by, depth);
                self.redirects(function.body.1.as_ref(), run_by, depth);
            }
            ast::Command::ExtendedTest(test, redirects) => {
                self.test(&test.expr, run_by, depth);
                self.redirects(redirects.as_ref(), run_by, depth);
            }
        }
    }

    fn compound(&mut self, compound: &ast::CompoundCommand, run_by: Option<usize>, depth: usize) {
        use ast::CompoundCommand as C;
        match compound {
            C::Arithmetic(arith) => self.arithmetic(&arith.expr.value),
            C::ArithmeticForClause(clause) => {
                for expr in [&clause.initializer, &clause.condition, &clause.updater]
                    .into_iter()
                    .flatten()
                {
                    self.arithmetic(&expr.value);
                }
                self.list(&clause.body.list, run_by, depth);
            }
            C::BraceGroup(group) => self.list(&group.list, run_by, depth),
            C::Subshell(subshell) => self.list(&subshell.list, run_by, depth),
            C::ForClause(clause) => {
                for value in clause.values.iter().flatten() {
                    self.word(value, run_by, depth);
                }
                self.list(&clause.body.list, run_by, depth);
            }
            C::CaseClause(clause) => {
                self.word(&clause.value, run_by, depth);
                for item in &clause.cases {
                    for pattern in &item.patterns {
                        self.word(pattern, run_by, depth);
                    }
                    if let Some(list) = &item.cmd {
                        self.list(list, run_by, depth);
                    }
                }
            }
            C::IfClause(clause) => {
                self.list(&clause.condition, run_by, depth);
                self.list(&clause.then, run_by, depth);
                for branch in clause.elses.iter().flatten() {
                    if let Some(condition) = &branch.condition {
                        self.list(condition, run_by, depth);
                    }
                    self.list(&branch.body, run_by, depth);
                }
            }
            C::WhileClause(clause) | C::UntilClause(clause) => {
                self.list(&clause.0, run_by, depth);
                self.list(&clause.1.list, run_by, depth);
            }
            C::Coprocess(coprocess) => self.command(&coprocess.body, run_by, depth),
        }
    }

    fn test(&mut self, expr: &ast::ExtendedTestExpr, run_by: Option<usize>, depth: usize) {
        use ast::ExtendedTestExpr as T;
        match expr {
            T::And(a, b) | T::Or(a, b) => {
                self.test(a, run_by, depth);
                self.test(b, run_by, depth);
            }
            T::Not(a) | T::Parenthesized(a) => self.test(a, run_by, depth),
            T::UnaryTest(_, w) => {
                self.word(w, run_by, depth);
            }
            T::BinaryTest(_, a, b) => {
                self.word(a, run_by, depth);
                self.word(b, run_by, depth);
            }
        }
    }

    /// `$(( … ))` may hide a substitution, which is not followed there.
    fn arithmetic(&mut self, text: &str) {
        if text.contains("$(") || text.contains('`') {
            self.unknown(text, "a command substitution inside arithmetic");
        }
    }

    fn simple(&mut self, simple: &ast::SimpleCommand, run_by: Option<usize>, depth: usize) {
        // Before the name: assignments (the command's environment) and
        // redirections; their substitutions run, their words are no
        // arguments.
        for item in simple.prefix.iter().flat_map(|p| &p.0) {
            self.item(item, run_by, depth);
        }
        let Some(name) = &simple.word_or_name else {
            return;
        };
        let mut words = vec![self.word(name, run_by, depth)];
        for item in simple.suffix.iter().flat_map(|s| &s.0) {
            if let Some(word) = self.item(item, run_by, depth) {
                words.push(word);
            }
        }
        let index = self.line.commands.len();
        self.line.commands.push(Command {
            words,
            run_by,
            transparent: false,
        });
        self.wrapped(index, depth);
    }

    /// A prefix or suffix item; the word it gives as an argument, if any.
    fn item(
        &mut self,
        item: &ast::CommandPrefixOrSuffixItem,
        run_by: Option<usize>,
        depth: usize,
    ) -> Option<Word> {
        use ast::CommandPrefixOrSuffixItem as I;
        match item {
            I::IoRedirect(redirect) => {
                self.redirect(redirect, run_by, depth);
                None
            }
            I::Word(w) => Some(self.word(w, run_by, depth)),
            I::AssignmentWord(assignment, w) => Some(self.assignment(assignment, w, run_by, depth)),
            I::ProcessSubstitution(_, subshell) => {
                self.list(&subshell.list, run_by, depth);
                Some(Word::Dynamic {
                    text: "<(…)".into(),
                    splits: false,
                })
            }
        }
    }

    fn assignment(
        &mut self,
        assignment: &ast::Assignment,
        as_word: &ast::Word,
        run_by: Option<usize>,
        depth: usize,
    ) -> Word {
        match &assignment.value {
            ast::AssignmentValue::Scalar(value) => {
                self.word(value, run_by, depth);
            }
            ast::AssignmentValue::Array(values) => {
                for (key, value) in values {
                    if let Some(key) = key {
                        self.word(key, run_by, depth);
                    }
                    self.word(value, run_by, depth);
                }
            }
        }
        self.word(as_word, run_by, depth)
    }

    fn redirects(&mut self, list: Option<&ast::RedirectList>, run_by: Option<usize>, depth: usize) {
        for redirect in list.iter().flat_map(|l| &l.0) {
            self.redirect(redirect, run_by, depth);
        }
    }

    fn redirect(&mut self, redirect: &ast::IoRedirect, run_by: Option<usize>, depth: usize) {
        use ast::{IoFileRedirectKind as K, IoFileRedirectTarget as T, IoRedirect as R};
        match redirect {
            R::File(_, kind, target) => match target {
                T::Filename(file) => {
                    let file_word = self.word(file, run_by, depth);
                    let writes =
                        matches!(kind, K::Write | K::Append | K::ReadAndWrite | K::Clobber);
                    if writes {
                        self.written(&file_word, &redirect.to_string());
                    }
                }
                T::ProcessSubstitution(_, subshell) => self.list(&subshell.list, run_by, depth),
                T::Duplicate(w) => {
                    self.word(w, run_by, depth);
                }
                T::Fd(_) => {}
            },
            R::HereDocument(_, doc) => {
                // Quotes in a here-document are text: only its
                // substitutions matter, and only when it is expanded.
                let text = &doc.doc.value;
                if doc.requires_expansion && (text.contains("$(") || text.contains('`')) {
                    self.word(&doc.doc, run_by, depth);
                }
            }
            R::HereString(_, w) => {
                self.word(w, run_by, depth);
            }
            R::OutputAndError(file, _) => {
                let file_word = self.word(file, run_by, depth);
                self.written(&file_word, &redirect.to_string());
            }
        }
    }

    /// A redirection that writes: harmless to the null device and the
    /// standard streams, otherwise a file written that no rule names.
    fn written(&mut self, file: &Word, text: &str) {
        const HARMLESS: [&str; 5] = [
            "/dev/null",
            "/dev/stdout",
            "/dev/stderr",
            "/dev/fd/1",
            "/dev/fd/2",
        ];
        if !matches!(file, Word::Static(f) if HARMLESS.contains(&f.as_str())) {
            self.unknown(text, "writes to a file through a redirection");
        }
    }

    /// A word: its value if it is static; the substitutions in it are
    /// followed as scripts.
    fn word(&mut self, w: &ast::Word, run_by: Option<usize>, depth: usize) -> Word {
        let pieces = match word::parse(&w.value, &self.options) {
            Ok(pieces) => pieces,
            Err(error) => {
                self.unknown(
                    &w.value,
                    format!("the shell cannot read this word ({error})"),
                );
                return Word::Dynamic {
                    text: w.value.clone(),
                    splits: true,
                };
            }
        };
        let mut value = String::new();
        let mut dynamic = None;
        self.pieces(
            &w.value,
            &pieces,
            false,
            &mut value,
            &mut dynamic,
            run_by,
            depth,
        );
        match dynamic {
            None => Word::Static(value),
            Some(splits) => Word::Dynamic {
                text: w.value.clone(),
                splits,
            },
        }
    }

    /// `dynamic` becomes `Some(splits)` once an expansion is seen.
    #[expect(clippy::too_many_arguments, reason = "one recursive walk")]
    fn pieces(
        &mut self,
        source: &str,
        pieces: &[WordPieceWithSource],
        quoted: bool,
        value: &mut String,
        dynamic: &mut Option<bool>,
        run_by: Option<usize>,
        depth: usize,
    ) {
        let expanded = |dynamic: &mut Option<bool>, splits: bool| {
            *dynamic = Some(dynamic.unwrap_or(false) || splits);
        };
        for piece in pieces {
            match &piece.piece {
                WordPiece::Text(text) => {
                    if !quoted && !self.globs_are_text && text.contains(['*', '?', '[']) {
                        // Pathname expansion: any number of file names.
                        expanded(dynamic, true);
                    }
                    value.push_str(text);
                }
                WordPiece::SingleQuotedText(text) | WordPiece::AnsiCQuotedText(text) => {
                    value.push_str(text)
                }
                WordPiece::EscapeSequence(text) => {
                    value.push_str(text.strip_prefix('\\').unwrap_or(text))
                }
                WordPiece::DoubleQuotedSequence(inner)
                | WordPiece::GettextDoubleQuotedSequence(inner) => {
                    self.pieces(source, inner, true, value, dynamic, run_by, depth)
                }
                WordPiece::TildeExpansion(_) => expanded(dynamic, false),
                WordPiece::ParameterExpansion(_) => {
                    let text = source
                        .get(piece.start_index..piece.end_index)
                        .unwrap_or(source);
                    if text.contains("$(") || text.contains('`') || text.contains("<(") {
                        self.unknown(text, "a command substitution inside a parameter expansion");
                    }
                    expanded(dynamic, !quoted);
                }
                WordPiece::CommandSubstitution(script)
                | WordPiece::BackquotedCommandSubstitution(script) => {
                    self.script(script, run_by, depth + 1);
                    expanded(dynamic, !quoted);
                }
                WordPiece::ArithmeticExpression(expr) => {
                    self.arithmetic(&expr.value);
                    expanded(dynamic, false);
                }
            }
        }
    }

    /// Follows what a wrapper, a shell or `find -exec` runs.
    fn wrapped(&mut self, index: usize, depth: usize) {
        if depth > MAX_DEPTH {
            let text = self.line.commands[index].to_string();
            return self.unknown(&text, format!("nested more than {MAX_DEPTH} levels deep"));
        }
        let command = &self.line.commands[index];
        let Some(name) = command.words[0].as_static() else {
            let text = command.to_string();
            return self.unknown(&text, "the command's name is only known when it runs");
        };
        let name = base_name(name).to_owned();
        let args = command.words[1..].to_vec();
        let transparent = TRANSPARENT.contains(&name.as_str()) || SHELLS.contains(&name.as_str());
        match runs(&name, &args) {
            Runs::Nothing => {}
            Runs::Command(words) => {
                self.line.commands[index].transparent = transparent;
                self.run(words, index, depth);
            }
            Runs::Commands(commands) => {
                for words in commands {
                    self.run(words, index, depth);
                }
            }
            Runs::Script(Word::Static(script)) => {
                self.line.commands[index].transparent = transparent;
                self.script(&script, Some(index), depth + 1)
            }
            Runs::Script(Word::Dynamic { .. }) => {
                let text = self.line.commands[index].to_string();
                self.unknown(
                    &text,
                    format!("the script `{name}` runs is built at run time"),
                )
            }
            Runs::Unknown(why) => {
                let text = self.line.commands[index].to_string();
                self.unknown(&text, why)
            }
        }
    }

    fn run(&mut self, words: Vec<Word>, run_by: usize, depth: usize) {
        let inner = self.line.commands.len();
        self.line.commands.push(Command {
            words,
            run_by: Some(run_by),
            transparent: false,
        });
        self.wrapped(inner, depth + 1);
    }
}

/// Runs the parser, which is not ours: a panic in it (a bug, found by
/// fuzzing or by a workload) makes the line unknown, never ends the task.
fn guarded<T>(parse: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).ok()
}

/// Inputs known to make brush-parser 0.4 panic (it unwraps the parse of a
/// number): a file descriptor number before `<`/`>`, or a directory-stack
/// index after `~`, too large for its type. Refused before parsing.
fn parser_trap(text: &str) -> Option<&'static str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits > 0 {
            let before = start.checked_sub(1).map(|b| bytes[b]);
            let tilde = before == Some(b'~')
                || (matches!(before, Some(b'+' | b'-')) && start >= 2 && bytes[start - 2] == b'~');
            if digits >= 10 && matches!(bytes.get(i), Some(b'<' | b'>')) {
                return Some("a file descriptor number too large");
            }
            if tilde && digits >= 19 {
                return Some("a directory-stack index too large");
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Here-documents are read only in their plain form: `<<TAG` or
/// `<<-TAG` (the tag a word of letters, digits and `_`, quoted or not),
/// its lines, and the tag on a line of its own, in a line with no
/// substitution. brush-parser 0.4 grows without bound on the other forms
/// (an empty or unterminated tag, one inside `$(…)`, `\<<<''`: 11-byte
/// lines took over 4 GB, found by fuzzing), and the shell refuses most of
/// them anyway. Matched on the bytes, quotes not read apart: a `<<` inside
/// a quoted word is refused too.
fn odd_here_document(text: &str) -> Option<&'static str> {
    let bytes = text.as_bytes();
    let substitutes = ["$(", "${", "`"].iter().any(|s| text.contains(s));
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        let run = bytes[i..].iter().take_while(|b| **b == b'<').count();
        let escaped = i > 0 && bytes[i - 1] == b'\\';
        let at = i;
        i += run;
        match run {
            1 => continue,
            3 if !escaped => continue, // a here-string
            2 if !escaped && !substitutes => {}
            _ => {
                return Some(
                    "a here-document in a form the agent does not read (only `<<TAG`, its lines, then TAG, with no substitution in the line)",
                );
            }
        }
        let (tag, strip, after) = match here_document_tag(&text[at + 2..]) {
            Some(found) => found,
            None => return Some("a here-document whose tag is not a plain word"),
        };
        let rest = &text[at + 2 + after..];
        let body = rest.split_once('\n').map(|(_, body)| body).unwrap_or("");
        let ends = body.lines().any(|line| {
            let line = if strip {
                line.trim_start_matches('\t')
            } else {
                line
            };
            line == tag
        });
        if !ends {
            return Some("a here-document with no line ending it");
        }
        i = at + 2 + after;
    }
    None
}

/// The tag after `<<`: (tag, whether `-` strips tabs, bytes read), if it
/// is a plain word followed by a blank, an operator or the line's end.
fn here_document_tag(after: &str) -> Option<(&str, bool, usize)> {
    let bytes = after.as_bytes();
    let strip = bytes.first() == Some(&b'-');
    let mut i = usize::from(strip);
    while matches!(bytes.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    let quote = match bytes.get(i) {
        Some(q @ (b'\'' | b'"')) => {
            i += 1;
            Some(*q)
        }
        _ => None,
    };
    let start = i;
    while bytes
        .get(i)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        i += 1;
    }
    if i == start {
        return None;
    }
    let tag = &after[start..i];
    if let Some(quote) = quote {
        if bytes.get(i) != Some(&quote) {
            return None;
        }
        i += 1;
    }
    match bytes.get(i) {
        None | Some(b' ' | b'\t' | b'\n' | b';' | b'>' | b'|' | b'&') => Some((tag, strip, i)),
        Some(_) => None,
    }
}

/// Counts what makes the parser recurse: brackets, substitutions and the
/// keywords that open a compound command.
fn structures(text: &str) -> usize {
    let brackets = text
        .bytes()
        .filter(|b| matches!(b, b'(' | b'{' | b'`'))
        .count();
    let keywords = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| matches!(*w, "if" | "while" | "until" | "for" | "case" | "select"))
        .count();
    brackets + keywords
}

/// What a command runs besides itself.
enum Runs {
    Nothing,
    Command(Vec<Word>),
    Commands(Vec<Vec<Word>>),
    /// A script its own shell reads (`sh -c SCRIPT`, `su -c SCRIPT`).
    Script(Word),
    Unknown(String),
}

/// A command that runs another one given in its arguments.
struct Wrapper {
    name: &'static str,
    /// Short options that take a value (as the next word, or attached).
    short_values: &'static str,
    /// Long options that take a value (as the next word, or after `=`).
    long_values: &'static [&'static str],
    /// Operands before the command (`timeout`'s duration).
    operands_first: usize,
    /// `NAME=VALUE` words may come before the command.
    assignments: bool,
    /// Options after which nothing runs (`sudo -l`, `command -v`).
    runs_nothing: &'static [&'static str],
    /// Options that, with no command, start a shell reading its input.
    shell_options: &'static [&'static str],
    /// What runs when no command is given.
    default: Option<&'static str>,
    /// It appends words read from its input (`xargs`).
    appends_input: bool,
}

const WRAPPER: Wrapper = Wrapper {
    name: "",
    short_values: "",
    long_values: &[],
    operands_first: 0,
    assignments: false,
    runs_nothing: &[],
    shell_options: &[],
    default: None,
    appends_input: false,
};

const WRAPPERS: &[Wrapper] = &[
    Wrapper {
        name: "env",
        short_values: "uC",
        long_values: &["--unset", "--chdir"],
        assignments: true,
        ..WRAPPER
    },
    Wrapper {
        name: "sudo",
        short_values: "ugCDhprtTUR",
        long_values: &[
            "--user",
            "--group",
            "--close-from",
            "--chdir",
            "--host",
            "--prompt",
            "--role",
            "--type",
            "--command-timeout",
            "--other-user",
            "--chroot",
        ],
        assignments: true,
        runs_nothing: &[
            "-l",
            "-v",
            "-k",
            "-K",
            "-V",
            "--list",
            "--validate",
            "--version",
            "--help",
        ],
        shell_options: &["-s", "-i", "--shell", "--login"],
        ..WRAPPER
    },
    Wrapper {
        name: "doas",
        short_values: "uC",
        shell_options: &["-s"],
        ..WRAPPER
    },
    Wrapper {
        name: "nice",
        short_values: "n",
        long_values: &["--adjustment"],
        ..WRAPPER
    },
    Wrapper {
        name: "nohup",
        ..WRAPPER
    },
    Wrapper {
        name: "timeout",
        short_values: "sk",
        long_values: &["--signal", "--kill-after"],
        operands_first: 1,
        ..WRAPPER
    },
    Wrapper {
        name: "xargs",
        short_values: "adEILnPs",
        long_values: &[
            "--arg-file",
            "--delimiter",
            "--max-lines",
            "--max-args",
            "--max-procs",
            "--max-chars",
            "--process-slot-var",
        ],
        default: Some("echo"),
        appends_input: true,
        ..WRAPPER
    },
    Wrapper {
        name: "exec",
        short_values: "a",
        ..WRAPPER
    },
    Wrapper {
        name: "command",
        runs_nothing: &["-v", "-V"],
        ..WRAPPER
    },
    Wrapper {
        name: "builtin",
        ..WRAPPER
    },
    Wrapper {
        name: "time",
        short_values: "fo",
        long_values: &["--format", "--output"],
        ..WRAPPER
    },
    Wrapper {
        name: "setsid",
        ..WRAPPER
    },
    Wrapper {
        name: "stdbuf",
        short_values: "ioe",
        long_values: &["--input", "--output", "--error"],
        ..WRAPPER
    },
    Wrapper {
        name: "ionice",
        short_values: "cnp",
        long_values: &["--class", "--classdata", "--pid", "--pgid", "--uid"],
        runs_nothing: &["-p", "-P", "-u", "--pid", "--pgid", "--uid"],
        ..WRAPPER
    },
    Wrapper {
        name: "chroot",
        long_values: &["--userspec", "--groups"],
        operands_first: 1,
        default: Some("sh"),
        ..WRAPPER
    },
];

/// Wrappers that change nothing about how the command they run is run
/// that a policy decides on (see [`Command::transparent`]); shells given a
/// script are too.
const TRANSPARENT: [&str; 10] = [
    "nohup", "nice", "timeout", "exec", "command", "builtin", "time", "setsid", "stdbuf", "xargs",
];

/// Shells, whose `-c` takes a script.
const SHELLS: [&str; 8] = ["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"];

/// Interpreters whose options take program text the agent cannot read.
const INTERPRETERS: [(&str, &[&str]); 6] = [
    ("python", &["-c"]),
    ("perl", &["-e", "-E"]),
    ("ruby", &["-e"]),
    ("node", &["-e", "-p", "--eval", "--print"]),
    ("nodejs", &["-e", "-p", "--eval", "--print"]),
    ("php", &["-r"]),
];

fn runs(name: &str, args: &[Word]) -> Runs {
    if let Some(wrapper) = WRAPPERS.iter().find(|w| w.name == name) {
        return wrapper.runs(args);
    }
    if SHELLS.contains(&name) {
        return shell_runs(name, args);
    }
    match name {
        "eval" => Runs::Unknown("eval runs text put together at run time".into()),
        "su" | "runuser" => su_runs(name, args),
        "find" => find_runs(args),
        "trap" => match args.first() {
            Some(Word::Static(s)) if s.starts_with('-') => Runs::Nothing,
            Some(action) if args.len() > 1 => Runs::Script(action.clone()),
            _ => Runs::Nothing,
        },
        _ => interpreter_runs(name, args),
    }
}

impl Wrapper {
    fn runs(&self, args: &[Word]) -> Runs {
        let mut rest = args;
        let mut shell = false;
        // Options, up to `--` or the first operand.
        while let Some((word, tail)) = rest.split_first() {
            let Some(option) = word.as_static() else {
                return Runs::Unknown(format!(
                    "cannot tell what `{}` runs: `{word}` is only known when it runs",
                    self.name
                ));
            };
            if option == "--" {
                rest = tail;
                break;
            }
            if !option.starts_with('-') || option == "-" {
                break;
            }
            rest = tail;
            if self.runs_nothing.contains(&option) {
                return Runs::Nothing;
            }
            shell |= self.shell_options.contains(&option);
            if is_number_option(self.name, option) {
                continue;
            }
            if let Some(long) = option.strip_prefix("--") {
                if self.name == "env" && long.starts_with("split-string") {
                    return Runs::Unknown("`env -S` splits a string into a command".into());
                }
                if self.long_values.contains(&option) {
                    rest = rest.get(1..).unwrap_or(&[]);
                }
                continue;
            }
            // A cluster: letters up to the first that takes a value, which
            // is the rest of the cluster or else the next word.
            for (i, letter) in option.char_indices().skip(1) {
                if self.name == "env" && letter == 'S' {
                    return Runs::Unknown("`env -S` splits a string into a command".into());
                }
                shell |= self
                    .shell_options
                    .iter()
                    .any(|o| o.len() == 2 && o.ends_with(letter));
                if self.short_values.contains(letter) {
                    if i + letter.len_utf8() == option.len() {
                        rest = rest.get(1..).unwrap_or(&[]);
                    }
                    break;
                }
            }
        }
        if self.assignments {
            while let Some((Word::Static(word), tail)) = rest.split_first() {
                if !is_assignment(word) {
                    break;
                }
                rest = tail;
            }
        }
        rest = rest.get(self.operands_first..).unwrap_or(&[]);
        if rest.is_empty() {
            if shell {
                return Runs::Unknown(format!(
                    "`{}` starts a shell that reads its commands from its input",
                    self.name
                ));
            }
            return match self.default {
                Some(default) => self.with_input(vec![Word::Static(default.into())]),
                None => Runs::Nothing,
            };
        }
        self.with_input(rest.to_vec())
    }

    fn with_input(&self, mut words: Vec<Word>) -> Runs {
        if self.appends_input {
            words.push(Word::Dynamic {
                text: "(input)".into(),
                splits: true,
            });
        }
        Runs::Command(words)
    }
}

/// `nice -5`, `nice --10`: an adjustment written as an option.
fn is_number_option(name: &str, option: &str) -> bool {
    let digits = option.trim_start_matches('-');
    name == "nice" && !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// Whether `option` (as written) is `wanted`, a short option also inside
/// a cluster (`-En` has `-n`) and a long one also with `=value`.
fn option_is(option: &str, wanted: &str) -> bool {
    if let Some(long) = wanted.strip_prefix("--") {
        return option
            .strip_prefix("--")
            .is_some_and(|o| o == long || o.starts_with(&format!("{long}=")));
    }
    let letter = wanted.trim_start_matches('-');
    !option.starts_with("--") && option.len() > 1 && option[1..].contains(letter)
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
    })
}

fn shell_runs(name: &str, args: &[Word]) -> Runs {
    let mut rest = args;
    let (mut script, mut stdin) = (false, false);
    if name == "busybox" {
        // `busybox sh -c …`: the applet is the shell.
        match rest.split_first() {
            Some((Word::Static(applet), tail)) if SHELLS.contains(&applet.as_str()) => rest = tail,
            Some((Word::Static(applet), tail)) => {
                return runs(applet, tail);
            }
            _ => return Runs::Unknown("`busybox` runs an applet only known when it runs".into()),
        }
    }
    while let Some((word, tail)) = rest.split_first() {
        let Some(option) = word.as_static() else {
            if script {
                break;
            }
            return Runs::Unknown(format!("`{name}` is given options only known when it runs"));
        };
        if option == "--" || option == "-" {
            rest = tail;
            break;
        }
        if !(option.starts_with('-') || option.starts_with('+')) || option.len() < 2 {
            break;
        }
        rest = tail;
        if let Some(long) = option.strip_prefix("--") {
            if matches!(long, "rcfile" | "init-file") && !rest.is_empty() {
                rest = &rest[1..];
            }
            continue;
        }
        let letters = &option[1..];
        script |= letters.contains('c');
        stdin |= letters.contains('s');
        if letters.contains('o') && !rest.is_empty() {
            rest = &rest[1..];
        }
    }
    match (script, rest.first()) {
        (true, Some(text)) => Runs::Script(text.clone()),
        (true, None) => Runs::Nothing,
        (false, Some(_)) if !stdin => Runs::Nothing,
        _ => Runs::Unknown(format!("`{name}` reads its commands from its input")),
    }
}

fn su_runs(name: &str, args: &[Word]) -> Runs {
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_static() {
            Some("-c" | "--command") => {
                return match words.next() {
                    Some(script) => Runs::Script(script.clone()),
                    None => Runs::Nothing,
                };
            }
            Some(option) if option.starts_with("--command=") => {
                return Runs::Script(Word::Static(option["--command=".len()..].to_owned()));
            }
            Some(option) if option.starts_with("-c") && !option.starts_with("--") => {
                return Runs::Script(Word::Static(option[2..].to_owned()));
            }
            _ => {}
        }
    }
    Runs::Unknown(format!(
        "`{name}` starts a shell that reads its commands from its input"
    ))
}

/// `find … -exec CMD … ;` (and `-execdir`, `-ok`, `-okdir`).
fn find_runs(args: &[Word]) -> Runs {
    let mut commands = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if matches!(
            word.as_static(),
            Some("-exec" | "-execdir" | "-ok" | "-okdir")
        ) {
            let command: Vec<Word> = words
                .by_ref()
                .take_while(|w| !matches!(w.as_static(), Some(";" | "+")))
                .cloned()
                .collect();
            if !command.is_empty() {
                commands.push(command);
            }
        }
    }
    if commands.is_empty() {
        Runs::Nothing
    } else {
        Runs::Commands(commands)
    }
}

fn interpreter_runs(name: &str, args: &[Word]) -> Runs {
    let family = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let Some((_, code_options)) = INTERPRETERS.iter().find(|(n, _)| *n == family) else {
        return Runs::Nothing;
    };
    for word in args {
        let Some(option) = word.as_static() else {
            continue;
        };
        if !option.starts_with('-') {
            break;
        }
        if code_options.iter().any(|o| option_is(option, o)) {
            return Runs::Unknown(format!(
                "`{name} {option}` runs program text the agent cannot read"
            ));
        }
    }
    Runs::Nothing
}
