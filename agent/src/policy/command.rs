//! SSH command lines as policy sees them: split into words with the shell's
//! quoting rules, and cut into simple commands at its control operators.
//!
//! Written here rather than taken from `shlex` / `shell-words`: those give
//! words but not where `;`, `&&`, `|` or `$(...)` cut the line, and that
//! is what decides whether an allowed command hides another one.
use super::Pattern;

/// A command line as the remote shell will read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    /// The simple commands, in order (one, unless the line is compound).
    pub commands: Vec<Vec<String>>,
    /// Whether the shell would do more than run one program with these
    /// words: operators (`;` `&` `|` `<` `>` newline), substitutions (`$(`,
    /// backquote, `$VAR`) or unbalanced quotes. An allow rule never covers
    /// such a line, whatever its words: it cannot vouch for what runs.
    pub compound: bool,
}

impl CommandLine {
    pub fn parse(line: &str) -> Self {
        let mut parsed = CommandLine::default();
        let mut words: Vec<String> = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        let mut chars = line.chars().peekable();
        let end_command = |words: &mut Vec<String>, parsed: &mut CommandLine| {
            if !words.is_empty() {
                parsed.commands.push(std::mem::take(words));
            }
        };
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                ';' | '&' | '|' | '\n' | '<' | '>' | '(' | ')' => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                    parsed.compound = true;
                    end_command(&mut words, &mut parsed);
                }
                '`' => {
                    parsed.compound = true;
                    word.push(c);
                    in_word = true;
                }
                '$' => {
                    // `$VAR`, `${...}`, `$(...)`: the shell substitutes.
                    if chars.peek().is_some_and(|n| {
                        n.is_ascii_alphanumeric() || matches!(n, '{' | '(' | '_' | '@' | '*' | '?')
                    }) {
                        parsed.compound = true;
                    }
                    word.push(c);
                    in_word = true;
                }
                '\\' => {
                    in_word = true;
                    match chars.next() {
                        Some('\n') | None => {}
                        Some(escaped) => word.push(escaped),
                    }
                }
                '\'' => {
                    in_word = true;
                    loop {
                        match chars.next() {
                            Some('\'') => break,
                            Some(inner) => word.push(inner),
                            None => {
                                parsed.compound = true;
                                break;
                            }
                        }
                    }
                }
                '"' => {
                    in_word = true;
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some(e @ ('"' | '\\' | '$' | '`')) => word.push(e),
                                Some('\n') => {}
                                Some(other) => {
                                    word.push('\\');
                                    word.push(other);
                                }
                                None => {
                                    parsed.compound = true;
                                    break;
                                }
                            },
                            Some(inner @ ('$' | '`')) => {
                                parsed.compound = true;
                                word.push(inner);
                            }
                            Some(inner) => word.push(inner),
                            None => {
                                parsed.compound = true;
                                break;
                            }
                        }
                    }
                }
                '#' if !in_word => {
                    // A comment runs to the end of the line; a newline
                    // after it starts another command.
                    for rest in chars.by_ref() {
                        if rest == '\n' {
                            parsed.compound = true;
                            break;
                        }
                    }
                }
                other => {
                    word.push(other);
                    in_word = true;
                }
            }
        }
        if in_word {
            words.push(word);
        }
        end_command(&mut words, &mut parsed);
        parsed
    }
}

/// A command pattern from a rule, e.g. `systemctl restart app*` or
/// `rm -rf *`: words matched one by one with globs; a last word `*` also
/// matches any number of further words (or none), and `**` anywhere
/// matches any run of words.
#[derive(Clone, Debug)]
pub struct CommandPattern {
    words: Vec<WordPattern>,
}

#[derive(Clone, Debug)]
enum WordPattern {
    Word(Pattern),
    /// `**`, and a trailing `*`.
    AnyWords,
}

impl CommandPattern {
    pub fn new(text: &str) -> Result<Self, String> {
        let line = CommandLine::parse(text);
        let [words] = line.commands.as_slice() else {
            return Err(format!("{text:?} is not one command"));
        };
        let last = words.len() - 1;
        let words = words
            .iter()
            .enumerate()
            .map(|(i, word)| match word.as_str() {
                "**" => Ok(WordPattern::AnyWords),
                "*" if i == last && i > 0 => Ok(WordPattern::AnyWords),
                _ => Pattern::new(word)
                    .map(WordPattern::Word)
                    .map_err(|e| format!("{text:?}: bad pattern {word:?}: {e}")),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { words })
    }

    /// Whether these words (one simple command) match.
    pub fn matches(&self, words: &[String]) -> bool {
        fn go(pattern: &[WordPattern], words: &[String]) -> bool {
            match pattern.split_first() {
                None => words.is_empty(),
                Some((WordPattern::AnyWords, rest)) => {
                    (0..=words.len()).any(|skip| go(rest, &words[skip..]))
                }
                Some((WordPattern::Word(p), rest)) => words
                    .split_first()
                    .is_some_and(|(w, tail)| p.matches(w) && go(rest, tail)),
            }
        }
        go(&self.words, words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<Vec<String>> {
        CommandLine::parse(line).commands
    }

    #[test]
    fn quoting_follows_the_shell() {
        assert_eq!(
            words(r#"git-upload-pack '/srv/my repo.git'"#),
            [["git-upload-pack", "/srv/my repo.git"]]
        );
        assert_eq!(
            words(r#"echo "a \"b\"" c\ d"#),
            [["echo", "a \"b\"", "c d"]]
        );
        assert_eq!(words("  true  "), [["true"]]);
        assert!(!CommandLine::parse("systemctl restart app").compound);
        assert!(!CommandLine::parse("echo '$HOME; rm'").compound);
    }

    #[test]
    fn operators_and_substitutions_make_a_line_compound() {
        for line in [
            "systemctl restart app; rm -rf /",
            "a && b",
            "a | b",
            "a > /etc/passwd",
            "echo $(id)",
            "echo `id`",
            "echo \"$HOME\"",
            "echo $HOME",
            "a\nb",
            "echo 'unterminated",
        ] {
            assert!(CommandLine::parse(line).compound, "{line:?}");
        }
        assert_eq!(
            words("true; sudo rm -rf / && echo done"),
            [
                vec!["true"],
                vec!["sudo", "rm", "-rf", "/"],
                vec!["echo", "done"]
            ]
        );
    }

    #[test]
    fn patterns_match_word_by_word() {
        let p = CommandPattern::new("systemctl restart app*").unwrap();
        assert!(p.matches(&words("systemctl restart app-web")[0]));
        assert!(!p.matches(&words("systemctl restart db")[0]));
        assert!(!p.matches(&words("systemctl restart app extra")[0]));
        let p = CommandPattern::new("journalctl -u app *").unwrap();
        assert!(p.matches(&words("journalctl -u app")[0]));
        assert!(p.matches(&words("journalctl -u app -n 50 --no-pager")[0]));
        let p = CommandPattern::new("** sudo **").unwrap();
        assert!(p.matches(&words("env X=1 sudo ls")[0]));
        assert!(p.matches(&words("sudo")[0]));
        assert!(!p.matches(&words("pseudo")[0]));
        let p = CommandPattern::new("*").unwrap();
        assert!(p.matches(&words("anything")[0]));
        assert!(!p.matches(&words("any thing")[0]));
        assert!(CommandPattern::new("a; b").is_err());
    }
}
