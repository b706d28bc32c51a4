//! Command patterns, as rules write them, matched against the simple
//! commands of a line (see [`super::shell`]).
//!
//! A pattern is a command name and words: `systemctl restart app*`,
//! `rm -rf *`. Options are read as a set, the way the usual conventions
//! read them: `-rf` is `-r -f` is `-fr`, anywhere before `--`; for a few
//! commands long options are their short ones (`rm --recursive --force`
//! is `rm -rf`). The other words (operands) match in order, each a glob; a
//! last word `*` is any further words, options included, and `**` anywhere
//! any run of words. A pattern whose first word is `**` matches the words
//! in order, options not read apart.
use super::{
    Pattern,
    shell::{Command, Word, base_name},
};

pub use super::shell::CommandLine;

/// How a command must match: every possibility covered (allow), or any
/// possibility hit (deny, approve).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    Allow,
    Any,
}

/// A command pattern from a rule.
#[derive(Clone, Debug)]
pub struct CommandPattern {
    shape: Shape,
}

#[derive(Clone, Debug)]
enum Shape {
    /// `** …`: all the words in order.
    Words(Vec<WordPattern>),
    Command {
        name: Pattern,
        /// `/usr/bin/rm` is matched whole; `rm` matches any path's base name.
        name_has_path: bool,
        options: Vec<String>,
        operands: Vec<WordPattern>,
        /// Any further words are allowed (a `*` or `**` among the operands).
        open: bool,
    },
}

#[derive(Clone, Debug)]
enum WordPattern {
    Glob(Pattern),
    /// An expansion written in the pattern (`~`, `$HOME`): the same text.
    Exact(String),
    /// `**`, and a trailing `*`.
    AnyWords,
}

impl CommandPattern {
    pub fn new(text: &str) -> Result<Self, String> {
        let words = CommandLine::pattern_words(text)?;
        let last = words.len().saturating_sub(1);
        let word_pattern = |(i, word): (usize, &Word)| match word {
            Word::Static(w) if w == "**" => Ok(WordPattern::AnyWords),
            Word::Static(w) if w == "*" && i == last && i > 0 => Ok(WordPattern::AnyWords),
            Word::Static(w) => Pattern::new(w)
                .map(WordPattern::Glob)
                .map_err(|e| format!("{text:?}: bad pattern {w:?}: {e}")),
            Word::Dynamic { text, .. } => Ok(WordPattern::Exact(text.clone())),
        };
        let Some((first, rest)) = words.split_first() else {
            return Err(format!("{text:?} names no command"));
        };
        if first.as_static() == Some("**") {
            let words = words
                .iter()
                .enumerate()
                .map(word_pattern)
                .collect::<Result<_, _>>()?;
            return Ok(Self {
                shape: Shape::Words(words),
            });
        }
        let Word::Static(name) = first else {
            return Err(format!("{text:?}: the command name must be written out"));
        };
        let (option_words, operand_words) = split_options(rest);
        let mut options = Vec::new();
        for word in option_words {
            let Word::Static(option) = word else {
                return Err(format!("{text:?}: options must be written out"));
            };
            if option.contains(['*', '?', '[']) {
                return Err(format!(
                    "{text:?}: options are written out ({option:?} is a glob); a last `*` allows any further options"
                ));
            }
            add_options(option, base_name(name), &mut options);
        }
        let operands: Vec<WordPattern> = operand_words
            .iter()
            .map(|(i, w)| word_pattern((i + 1, w)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            shape: Shape::Command {
                name: Pattern::new(name)
                    .map_err(|e| format!("{text:?}: bad name {name:?}: {e}"))?,
                name_has_path: name.contains('/'),
                open: operands.iter().any(|o| matches!(o, WordPattern::AnyWords)),
                options,
                operands,
            },
        })
    }

    /// Whether this simple command matches.
    pub fn matches(&self, command: &Command, how: Match) -> bool {
        match &self.shape {
            Shape::Words(pattern) => {
                let mut words: Vec<&Word> = command.words.iter().collect();
                if sequence(pattern, &words, how) {
                    return true;
                }
                // `/usr/bin/sudo` is `sudo` too.
                let base = match command.words.first() {
                    Some(Word::Static(name)) if name.contains('/') => {
                        Word::Static(base_name(name).to_owned())
                    }
                    _ => return false,
                };
                words[0] = &base;
                sequence(pattern, &words, how)
            }
            Shape::Command {
                name,
                name_has_path,
                options,
                operands,
                open,
            } => {
                let Some((first, rest)) = command.words.split_first() else {
                    return false;
                };
                let named = match first {
                    Word::Static(word) if *name_has_path => name.matches(word),
                    Word::Static(word) => name.matches(base_name(word)),
                    Word::Dynamic { .. } => how == Match::Any,
                };
                if !named {
                    return false;
                }
                let command_name = first.as_static().map(base_name).unwrap_or_default();
                let (option_words, operand_words) = split_options(rest);
                let mut given = Vec::new();
                let mut unknown_options = false;
                for word in option_words {
                    match word {
                        Word::Static(option) => add_options(option, command_name, &mut given),
                        Word::Dynamic { .. } => unknown_options = true,
                    }
                }
                let operand_words: Vec<&Word> = operand_words.iter().map(|(_, w)| *w).collect();
                // In `Any`, an expansion among the operands may as well be
                // the options the pattern names.
                unknown_options |= how == Match::Any
                    && operand_words
                        .iter()
                        .any(|w| matches!(w, Word::Dynamic { .. }));
                let has_all = options.iter().all(|o| given.contains(o)) || unknown_options;
                let options_match = match how {
                    Match::Any => has_all,
                    Match::Allow => {
                        !unknown_options
                            && has_all
                            && (*open || given.iter().all(|o| options.contains(o)))
                    }
                };
                options_match && sequence(operands, &operand_words, how)
            }
        }
    }
}

/// Options (before `--`) and operands, with each operand's position. A
/// word `-` is an operand; an expansion is an operand too.
fn split_options(words: &[Word]) -> (Vec<&Word>, Vec<(usize, &Word)>) {
    let mut options = Vec::new();
    let mut operands = Vec::new();
    let mut ended = false;
    for (i, word) in words.iter().enumerate() {
        match word {
            Word::Static(w) if !ended && w == "--" => ended = true,
            Word::Static(w) if !ended && w.len() > 1 && w.starts_with('-') => options.push(word),
            _ => operands.push((i, word)),
        }
    }
    (options, operands)
}

/// Long options that are another name for a short one, by command.
const SAME_OPTIONS: &[(&str, &str, &str)] = &[
    ("rm", "--recursive", "-r"),
    ("rm", "-R", "-r"),
    ("rm", "--force", "-f"),
    ("rm", "--dir", "-d"),
    ("rm", "--verbose", "-v"),
    ("cp", "--recursive", "-r"),
    ("cp", "-R", "-r"),
    ("cp", "--force", "-f"),
    ("cp", "--archive", "-a"),
    ("cp", "--no-clobber", "-n"),
    ("mv", "--force", "-f"),
    ("mv", "--no-clobber", "-n"),
    ("ln", "--symbolic", "-s"),
    ("ln", "--force", "-f"),
    ("mkdir", "--parents", "-p"),
    ("rmdir", "--parents", "-p"),
    ("chmod", "--recursive", "-R"),
    ("chown", "--recursive", "-R"),
    ("chgrp", "--recursive", "-R"),
];

/// Adds an option word's options: `-rf` is `-r` and `-f`; a long option
/// stays itself (`--since=today`) unless it is another name of a short one.
fn add_options(word: &str, command: &str, out: &mut Vec<String>) {
    let canonical = |option: &str| {
        let long = option.split('=').next().unwrap_or(option);
        SAME_OPTIONS
            .iter()
            .find(|(c, o, _)| *c == command && *o == long)
            .map_or_else(|| option.to_owned(), |(_, _, short)| (*short).to_owned())
    };
    let mut push = |option: String| {
        if !out.contains(&option) {
            out.push(option);
        }
    };
    if word.starts_with("--") {
        push(canonical(word));
    } else {
        for letter in word.chars().skip(1) {
            push(canonical(&format!("-{letter}")));
        }
    }
}

/// Whether `pattern` matches `words` in order. Dynamic programming over
/// (pattern position, word position): `**` never backtracks exponentially.
fn sequence(pattern: &[WordPattern], words: &[&Word], how: Match) -> bool {
    let (m, n) = (pattern.len(), words.len());
    // matched[i][j]: pattern[i..] matches words[j..].
    let mut matched = vec![vec![false; n + 1]; m + 1];
    matched[m][n] = true;
    for j in (0..n).rev() {
        // Expansions may expand to nothing (in `Any`).
        matched[m][j] =
            how == Match::Any && matches!(words[j], Word::Dynamic { .. }) && matched[m][j + 1];
    }
    for i in (0..m).rev() {
        for j in (0..=n).rev() {
            matched[i][j] = match &pattern[i] {
                WordPattern::AnyWords => matched[i + 1][j] || (j < n && matched[i][j + 1]),
                _ if j == n => false,
                one => match (one, words[j]) {
                    (WordPattern::Glob(p), Word::Static(w)) => {
                        p.matches(w) && matched[i + 1][j + 1]
                    }
                    (WordPattern::Exact(t), Word::Static(w)) => t == w && matched[i + 1][j + 1],
                    (WordPattern::Exact(t), Word::Dynamic { text, .. }) if t == text => {
                        matched[i + 1][j + 1]
                    }
                    (_, Word::Dynamic { .. }) if how == Match::Any => {
                        // Nothing, this one word, or this and more.
                        matched[i][j + 1] || matched[i + 1][j + 1] || matched[i + 1][j]
                    }
                    _ => false,
                },
            };
        }
    }
    matched[0][0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands of a line, as text.
    fn commands(line: &str) -> Vec<String> {
        CommandLine::parse(line)
            .commands
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    fn unknown(line: &str) -> Vec<String> {
        CommandLine::parse(line)
            .unknown
            .iter()
            .map(|u| u.why.clone())
            .collect()
    }

    #[test]
    fn quoting_follows_the_shell() {
        assert_eq!(
            commands(r#"git-upload-pack '/srv/my repo.git'"#),
            ["git-upload-pack '/srv/my repo.git'"]
        );
        let line = CommandLine::parse(r#"echo "a \"b\"" c\ d r''m \rm"#);
        assert_eq!(
            line.commands[0].words,
            ["echo", "a \"b\"", "c d", "rm", "rm"].map(|w| Word::Static(w.into()))
        );
        assert!(line.unknown.is_empty());
        assert_eq!(commands("  true  "), ["true"]);
        assert_eq!(commands("echo '$HOME; rm'"), ["echo '$HOME; rm'"]);
    }

    #[test]
    fn every_command_of_the_line_is_found() {
        assert_eq!(
            commands("true; sudo rm -rf / && echo done | tee x || (id; uname)"),
            [
                "true",
                "sudo rm -rf /",
                "rm -rf /",
                "echo done",
                "tee x",
                "id",
                "uname"
            ]
        );
        assert_eq!(
            commands("echo $(rm -rf /x) `id`"),
            ["rm -rf /x", "id", "echo $(rm -rf /x) `id`"]
        );
        assert_eq!(
            commands("sh -c 'rm -rf /x'"),
            ["sh -c 'rm -rf /x'", "rm -rf /x"]
        );
        assert_eq!(
            commands(r#"bash -lc "cd /tmp && rm -r -f x""#),
            [
                r#"bash -lc 'cd /tmp && rm -r -f x'"#,
                "cd /tmp",
                "rm -r -f x"
            ]
        );
        for (line, inner) in [
            ("env X=1 rm -rf /x", "rm -rf /x"),
            ("env -i -u HOME X=1 rm -rf /x", "rm -rf /x"),
            ("sudo -u root -E rm -rf /x", "rm -rf /x"),
            ("sudo -uroot rm -rf /x", "rm -rf /x"),
            ("nice -n 5 rm -rf /x", "rm -rf /x"),
            ("nice -5 rm -rf /x", "rm -rf /x"),
            ("nohup rm -rf /x", "rm -rf /x"),
            ("timeout -s KILL 5 rm -rf /x", "rm -rf /x"),
            ("exec rm -rf /x", "rm -rf /x"),
            ("command rm -rf /x", "rm -rf /x"),
            ("/usr/bin/env rm -rf /x", "rm -rf /x"),
            ("su -c 'rm -rf /x' root", "rm -rf /x"),
            ("find / -name x -exec rm -rf {} ';'", "rm -rf {}"),
            ("for f in a b; do rm -rf $f; done", "rm -rf $f"),
            ("if true; then rm -rf /x; fi", "rm -rf /x"),
            ("f() { rm -rf /x; }; f", "rm -rf /x"),
            ("cat <(rm -rf /x)", "rm -rf /x"),
            ("X=$(rm -rf /x) true", "rm -rf /x"),
        ] {
            assert!(
                commands(line).contains(&inner.to_owned()),
                "{line}: {:?}",
                commands(line)
            );
        }
        assert_eq!(
            commands("echo x | xargs rm -f"),
            ["echo x", "xargs rm -f", "rm -f (input)"]
        );
    }

    #[test]
    fn plain_here_documents_are_read() {
        for line in [
            "cat >/dev/null <<EOF\nhello\nEOF",
            "cat <<'EOF' | wc -l\n$HOME\nEOF",
            "cat <<-EOF >/dev/null\n\thello\n\tEOF\nls",
            "cat <<<word",
        ] {
            assert!(unknown(line).is_empty(), "{line:?}: {:?}", unknown(line));
        }
        assert!(commands("cat <<-EOF >/dev/null\n\thello\n\tEOF\nls").contains(&"ls".to_owned()));
    }

    #[test]
    fn what_cannot_be_known_is_said() {
        for line in [
            "eval \"$CMD\"",
            "$CMD -rf /",
            "sh -c \"$SCRIPT\"",
            "bash",
            "sh -s",
            "sudo -s",
            "su root",
            "echo x > /etc/passwd",
            "python3 -c 'import os'",
            "env -S 'rm -rf /'",
            "echo ${X:-$(id)}",
            "echo 'unterminated",
        ] {
            assert!(!unknown(line).is_empty(), "{line}");
        }
        for line in [
            "echo x > /dev/null 2>&1",
            "ls -l",
            "echo ~",
            "git-upload-pack 'x'",
        ] {
            assert!(unknown(line).is_empty(), "{line}: {:?}", unknown(line));
        }
        // Inputs fuzzing found to crash the parser: refused, no panic.
        for line in [
            "8888888888888888888888888<8888888888su -8888888888888888888888su - root",
            "echo ~99999999999999999999999",
            "echo ~+99999999999999999999999 ~-99999999999999999999999",
        ] {
            assert!(!unknown(line).is_empty(), "{line}");
        }
        // brush-parser backtracks exponentially over unbalanced parentheses
        // after `((` (fuzzing found a 74-byte line that ran for minutes).
        let slow = format!("(({}", "(".repeat(40));
        let started = std::time::Instant::now();
        assert!(!unknown(&slow).is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Here-documents by the dozen made the parser take 4 GB (fuzzing).
        assert!(!unknown("cm<<\x0c\x0c\x0c\x0c\x0c<<<<<<<<<<<<<<<<<<<<<<<\x0c<<<<p ").is_empty());
        // One here-document whose tag is a carriage return took it past
        // 4 GB (fuzzing: `<<\r;  /x\xf9;  `).
        assert!(!unknown("<<\r;  /x\u{fffd};  ").is_empty());
        assert!(!unknown("cat <<\x0bEOF; ls").is_empty());
        // Odd here-documents took it past 4 GB in a few bytes (fuzzing):
        // an empty tag, one in a substitution, an escaped `<`.
        for line in [
            "sh -c<\u{fffd}Z<$( -c<< <<2ls)c<\u{fffd}Z<$( -c<< <#",
            "$(<< <<x)$(",
            "<<x$(( |$((",
            "<<-$( <<-\\${",
            "\\<<<''\t",
            "x$(\nx\n<<x\n)\nx\n",
            "cat <<EOF",
            "cat <<EOF\nno end",
            "cat <<EOF\n$(id)\nEOF",
        ] {
            assert!(!unknown(line).is_empty(), "{line:?}");
        }
        // Hostile shapes end in a refusal, not a deep recursion.
        let deep = format!("{}true{}", "(".repeat(5000), ")".repeat(5000));
        assert!(!unknown(&deep).is_empty());
        let nested = (0..20).fold("true".to_owned(), |inner, _| format!("sh -c {:?}", inner));
        assert!(!unknown(&nested).is_empty());
    }

    fn matches(pattern: &str, line: &str, how: Match) -> bool {
        let pattern = CommandPattern::new(pattern).unwrap();
        let line = CommandLine::parse(line);
        pattern.matches(&line.commands[0], how)
    }

    #[test]
    fn options_are_read_as_a_set() {
        for line in [
            "rm -rf /x",
            "rm -r -f /x",
            "rm -fr /x",
            "rm -Rf /x",
            "rm --recursive --force /x",
            "rm /x -rf",
            "rm -rfv /x",
            "/bin/rm -rf /x",
        ] {
            assert!(matches("rm -rf *", line, Match::Any), "{line}");
        }
        assert!(!matches("rm -rf *", "rm -f /x", Match::Any));
        // An expansion may be any option.
        assert!(matches("rm -rf *", "rm $FLAGS /x", Match::Any));
        assert!(!matches("rm -rf *", "rm $FLAGS /x", Match::Allow));
        // Allow: the options written, no more, unless the pattern is open.
        assert!(matches("rm -f /tmp/x", "rm -f /tmp/x", Match::Allow));
        assert!(!matches("rm -f /tmp/x", "rm -rf /tmp/x", Match::Allow));
        assert!(matches(
            "journalctl -u app *",
            "journalctl -u app -n 50 --no-pager",
            Match::Allow
        ));
    }

    #[test]
    fn patterns_match_word_by_word() {
        let allow = |p: &str, l: &str| matches(p, l, Match::Allow);
        assert!(allow("systemctl restart app*", "systemctl restart app-web"));
        assert!(!allow("systemctl restart app*", "systemctl restart db"));
        assert!(!allow(
            "systemctl restart app*",
            "systemctl restart app extra"
        ));
        assert!(!allow("systemctl restart app*", "systemctl restart $UNIT"));
        assert!(allow("journalctl -u app *", "journalctl -u app"));
        assert!(allow(
            "git-upload-pack *",
            "git-upload-pack '/srv/repo.git'"
        ));
        assert!(allow("echo ~", "echo ~"));
        assert!(allow("** sudo **", "env X=1 sudo ls"));
        assert!(matches("** sudo **", "sudo", Match::Any));
        assert!(!matches("** sudo **", "pseudo", Match::Any));
        assert!(allow("*", "anything"));
        assert!(!allow("*", "any thing"));
        assert!(CommandPattern::new("a; b").is_err());
        assert!(CommandPattern::new("rm -r* x").is_err());
        assert!(CommandPattern::new("echo > x").is_err());
    }

    #[test]
    fn many_wildcards_stay_linear() {
        let pattern = CommandPattern::new("** a ** a ** a ** b").unwrap();
        let line = CommandLine::parse(&format!("x{}", " a".repeat(3000)));
        assert!(!pattern.matches(&line.commands[0], Match::Any));
    }
}
