//! Lexer and block-tree builder for the FortiOS CLI dialect.
//!
//! Grammar, one statement per line (a quoted string may span lines):
//!
//! ```text
//! statement := "config" WORD+ | "edit" WORD | "set" WORD WORD+ | "unset" WORD
//!            | "next" | "end"
//! WORD      := bare-word | '"' chars '"' | "'" chars "'"
//! ```
//!
//! A backslash takes the next character literally, inside quotes (`\"`,
//! `\\`) and in bare words (`a\ b` is one word). `#` at the start of a word
//! comments out the rest of the line. Blank lines, tabs and CRLF line ends
//! are accepted. The builder is iterative and refuses nesting deeper than
//! [`MAX_DEPTH`], so no input can exhaust the stack.

use crate::diag::ErrorKind;

/// Deepest `config`/`edit` nesting accepted. FortiOS itself nests about six
/// levels; the limit only exists to bound memory and recursion.
pub const MAX_DEPTH: usize = 32;

/// A 1-based line and column (columns count characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub line: u32,
    pub col: u32,
}

/// One word of a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tok {
    pub text: String,
    pub pos: Pos,
    pub quoted: bool,
}

impl Tok {
    fn is_word(&self, w: &str) -> bool {
        !self.quoted && self.text == w
    }
}

/// A `config` block.
#[derive(Clone, Debug, Default)]
pub(crate) struct Block {
    pub pos: Pos,
    pub path: Vec<Tok>,
    pub items: Vec<Item>,
}

impl Block {
    /// The path as written, words joined by single spaces.
    pub fn path_string(&self) -> String {
        join_words(&self.path)
    }
}

pub(crate) fn join_words(toks: &[Tok]) -> String {
    let mut s = String::new();
    for (i, t) in toks.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&t.text);
    }
    s
}

/// An `edit` entry of a table.
#[derive(Clone, Debug)]
pub(crate) struct Edit {
    pub pos: Pos,
    pub name: Tok,
    pub items: Vec<Item>,
}

/// A statement inside a block or an edit.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    Set { key: Tok, values: Vec<Tok> },
    Unset { key: Tok },
    Config(Block),
    Edit(Edit),
}

/// A diagnostic raised while reading the text.
#[derive(Clone, Debug)]
pub(crate) enum SyntaxDiag {
    Error(Pos, ErrorKind),
    Warning(Pos, String),
}

fn syntax(pos: Pos, message: impl Into<String>) -> SyntaxDiag {
    SyntaxDiag::Error(
        pos,
        ErrorKind::Syntax {
            message: message.into(),
        },
    )
}

struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    pos: Pos,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line = self.pos.line.saturating_add(1);
            self.pos.col = 1;
        } else {
            self.pos.col = self.pos.col.saturating_add(1);
        }
        Some(c)
    }
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\u{feff}')
}

/// The statements of `text`, each a non-empty list of words, and the
/// position just past the end. Stops at the first unterminated string.
pub(crate) fn lex(text: &str, diags: &mut Vec<SyntaxDiag>) -> (Vec<Vec<Tok>>, Pos, bool) {
    let mut cur = Cursor {
        chars: text.chars().peekable(),
        pos: Pos { line: 1, col: 1 },
    };
    let mut stmts = Vec::new();
    let mut toks: Vec<Tok> = Vec::new();
    while let Some(c) = cur.peek() {
        if c == '\n' {
            cur.bump();
            if !toks.is_empty() {
                stmts.push(std::mem::take(&mut toks));
            }
        } else if is_space(c) {
            cur.bump();
        } else if c == '#' {
            while let Some(c) = cur.peek() {
                if c == '\n' {
                    break;
                }
                cur.bump();
            }
        } else if c == '"' || c == '\'' {
            let start = cur.pos;
            cur.bump();
            let mut s = String::new();
            let mut closed = false;
            while let Some(ch) = cur.bump() {
                if ch == '\\' {
                    match cur.bump() {
                        Some(n) => s.push(n),
                        None => break,
                    }
                } else if ch == c {
                    closed = true;
                    break;
                } else {
                    s.push(ch);
                }
            }
            if !closed {
                diags.push(syntax(
                    start,
                    format!("unterminated string: no closing {c} before the end of the input"),
                ));
                if !toks.is_empty() {
                    stmts.push(toks);
                }
                return (stmts, cur.pos, true);
            }
            if let Some(n) = cur.peek() {
                if !(is_space(n) || n == '\n') {
                    diags.push(syntax(
                        cur.pos,
                        format!("expected a space after the closing {c}, found {n:?}"),
                    ));
                }
            }
            toks.push(Tok {
                text: s,
                pos: start,
                quoted: true,
            });
        } else {
            let start = cur.pos;
            let mut s = String::new();
            while let Some(ch) = cur.peek() {
                if is_space(ch) || ch == '\n' {
                    break;
                }
                cur.bump();
                if ch == '\\' {
                    match cur.peek() {
                        Some(n) if n != '\n' => {
                            cur.bump();
                            s.push(n);
                        }
                        _ => s.push('\\'),
                    }
                } else {
                    s.push(ch);
                }
            }
            toks.push(Tok {
                text: s,
                pos: start,
                quoted: false,
            });
        }
    }
    if !toks.is_empty() {
        stmts.push(toks);
    }
    (stmts, cur.pos, false)
}

enum Frame {
    Block(Block),
    Edit(Edit),
}

impl Frame {
    fn items(&mut self) -> &mut Vec<Item> {
        match self {
            Frame::Block(b) => &mut b.items,
            Frame::Edit(e) => &mut e.items,
        }
    }
}

const COMMANDS: &str = "config, edit, set, unset, next, end";

/// Close the innermost frame into its parent. The root (index 0) is never
/// closed.
fn close_top(stack: &mut Vec<Frame>) {
    if stack.len() < 2 {
        return;
    }
    if let Some(frame) = stack.pop() {
        let item = match frame {
            Frame::Block(b) => Item::Config(b),
            Frame::Edit(e) => Item::Edit(e),
        };
        if let Some(parent) = stack.last_mut() {
            parent.items().push(item);
        }
    }
}

/// Parse `text` into the root block (empty path) holding the top-level
/// items. Every problem found is appended to `diags`.
pub(crate) fn parse_tree(text: &str, diags: &mut Vec<SyntaxDiag>) -> Block {
    let (stmts, eof, lex_fatal) = lex(text, diags);
    let mut stack: Vec<Frame> = vec![Frame::Block(Block::default())];
    for stmt in stmts {
        let Some((cmd, args)) = stmt.split_first() else {
            continue;
        };
        if cmd.quoted {
            diags.push(syntax(
                cmd.pos,
                format!(
                    "expected a command ({COMMANDS}), found the quoted string \"{}\"",
                    cmd.text
                ),
            ));
            continue;
        }
        let at_root = stack.len() < 2;
        match cmd.text.as_str() {
            "config" => {
                if args.is_empty() {
                    diags.push(syntax(
                        cmd.pos,
                        "config needs a block path, e.g. config system ha",
                    ));
                    continue;
                }
                if let Some(bad) = args.iter().find(|t| {
                    ["config", "edit", "set", "unset", "next", "end"]
                        .iter()
                        .any(|w| t.is_word(w))
                }) {
                    diags.push(syntax(
                        bad.pos,
                        format!(
                            "unexpected \"{}\" in a config path: put each command on its own line",
                            bad.text
                        ),
                    ));
                    continue;
                }
                if stack.len() > MAX_DEPTH {
                    diags.push(SyntaxDiag::Error(
                        cmd.pos,
                        ErrorKind::TooDeep { limit: MAX_DEPTH },
                    ));
                    return unwind(stack);
                }
                stack.push(Frame::Block(Block {
                    pos: cmd.pos,
                    path: args.to_vec(),
                    items: Vec::new(),
                }));
            }
            "edit" => {
                let Some(name) = args.first() else {
                    diags.push(syntax(cmd.pos, "edit needs a name or number"));
                    continue;
                };
                if let Some(extra) = args.get(1) {
                    diags.push(syntax(
                        extra.pos,
                        "edit takes one name; quote a name that contains spaces",
                    ));
                    continue;
                }
                if matches!(stack.last(), Some(Frame::Edit(_))) {
                    let open = match stack.last() {
                        Some(Frame::Edit(e)) => e.name.text.clone(),
                        _ => String::new(),
                    };
                    diags.push(syntax(
                        cmd.pos,
                        format!("edit inside edit \"{open}\": expected next before another edit"),
                    ));
                    close_top(&mut stack);
                } else if at_root {
                    diags.push(syntax(cmd.pos, "edit outside a config block"));
                }
                if stack.len() > MAX_DEPTH {
                    diags.push(SyntaxDiag::Error(
                        cmd.pos,
                        ErrorKind::TooDeep { limit: MAX_DEPTH },
                    ));
                    return unwind(stack);
                }
                stack.push(Frame::Edit(Edit {
                    pos: cmd.pos,
                    name: name.clone(),
                    items: Vec::new(),
                }));
            }
            "set" => {
                let Some((key, values)) = args.split_first() else {
                    diags.push(syntax(cmd.pos, "set needs a key and a value"));
                    continue;
                };
                if values.is_empty() {
                    let col = key.pos.col.saturating_add(
                        u32::try_from(key.text.chars().count()).unwrap_or(u32::MAX),
                    );
                    diags.push(syntax(
                        Pos {
                            line: key.pos.line,
                            col,
                        },
                        format!(
                            "set {} needs a value (use unset to restore the default)",
                            key.text
                        ),
                    ));
                    continue;
                }
                if at_root {
                    diags.push(syntax(cmd.pos, "set outside a config block"));
                    continue;
                }
                if let Some(top) = stack.last_mut() {
                    top.items().push(Item::Set {
                        key: key.clone(),
                        values: values.to_vec(),
                    });
                }
            }
            "unset" => {
                let Some(key) = args.first() else {
                    diags.push(syntax(cmd.pos, "unset needs a key"));
                    continue;
                };
                if let Some(extra) = args.get(1) {
                    diags.push(syntax(extra.pos, "unset takes only a key, no value"));
                    continue;
                }
                if at_root {
                    diags.push(syntax(cmd.pos, "unset outside a config block"));
                    continue;
                }
                if let Some(top) = stack.last_mut() {
                    top.items().push(Item::Unset { key: key.clone() });
                }
            }
            "next" => {
                if let Some(extra) = args.first() {
                    diags.push(syntax(extra.pos, "next takes no argument"));
                }
                if matches!(stack.last(), Some(Frame::Edit(_))) {
                    close_top(&mut stack);
                } else {
                    diags.push(syntax(cmd.pos, "next without a matching edit"));
                }
            }
            "end" => {
                if let Some(extra) = args.first() {
                    diags.push(syntax(extra.pos, "end takes no argument"));
                }
                if at_root {
                    diags.push(syntax(cmd.pos, "end without a matching config"));
                    continue;
                }
                if let Some(Frame::Edit(e)) = stack.last() {
                    diags.push(SyntaxDiag::Warning(
                        cmd.pos,
                        format!("end closes edit \"{}\" without next", e.name.text),
                    ));
                    close_top(&mut stack);
                }
                close_top(&mut stack);
            }
            other => {
                diags.push(syntax(
                    cmd.pos,
                    format!("unknown command \"{other}\"; expected one of {COMMANDS}"),
                ));
            }
        }
    }
    if stack.len() > 1 && !lex_fatal {
        let open: Vec<String> = stack
            .iter()
            .skip(1)
            .map(|f| match f {
                Frame::Block(b) => format!("config {} (line {})", b.path_string(), b.pos.line),
                Frame::Edit(e) => format!("edit \"{}\" (line {})", e.name.text, e.pos.line),
            })
            .collect();
        diags.push(syntax(
            eof,
            format!(
                "unexpected end of input: expected next/end to close {}",
                open.join(", ")
            ),
        ));
    }
    unwind(stack)
}

/// Close every open frame and return the root.
fn unwind(mut stack: Vec<Frame>) -> Block {
    while stack.len() > 1 {
        close_top(&mut stack);
    }
    match stack.pop() {
        Some(Frame::Block(b)) => b,
        _ => Block::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex_ok(text: &str) -> Vec<Vec<String>> {
        let mut d = Vec::new();
        let (s, _, fatal) = lex(text, &mut d);
        assert!(d.is_empty(), "{d:?}");
        assert!(!fatal);
        s.into_iter()
            .map(|t| t.into_iter().map(|t| t.text).collect())
            .collect()
    }

    #[test]
    fn words_quotes_escapes_comments() {
        assert_eq!(
            lex_ok("set a \"b c\" 'd' e\\ f # tail\r\n\n  # whole line\nset x \"q\\\"uote\\\\\"\n"),
            vec![
                vec!["set", "a", "b c", "d", "e f"],
                vec!["set", "x", "q\"uote\\"],
            ]
        );
        assert_eq!(lex_ok("set a ''"), vec![vec!["set", "a", ""]]);
        assert_eq!(
            lex_ok("set a \"two\nlines\""),
            vec![vec!["set", "a", "two\nlines"]]
        );
    }

    #[test]
    fn positions_count_characters() {
        let mut d = Vec::new();
        let (s, _, _) = lex("  set é \"x\"\n\tend", &mut d);
        let p: Vec<Pos> = s.iter().flatten().map(|t| t.pos).collect();
        assert_eq!(
            p,
            vec![
                Pos { line: 1, col: 3 },
                Pos { line: 1, col: 7 },
                Pos { line: 1, col: 9 },
                Pos { line: 2, col: 2 },
            ]
        );
    }

    #[test]
    fn unterminated_string_is_an_error_at_the_quote() {
        let mut d = Vec::new();
        let (_, _, fatal) = lex("set a \"oops\nmore", &mut d);
        assert!(fatal);
        match d.as_slice() {
            [SyntaxDiag::Error(pos, ErrorKind::Syntax { message })] => {
                assert_eq!(*pos, Pos { line: 1, col: 7 });
                assert!(message.contains("unterminated"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tree_nests() {
        let mut d = Vec::new();
        let root = parse_tree(
            "config a b\n set k v\n config c\n  edit 1\n   set x y\n  next\n end\nend\n",
            &mut d,
        );
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(root.items.len(), 1);
        let Some(Item::Config(b)) = root.items.first() else {
            panic!()
        };
        assert_eq!(b.path_string(), "a b");
        assert_eq!(b.items.len(), 2);
    }

    #[test]
    fn structural_errors() {
        for (text, needle) in [
            ("next\n", "next without"),
            ("end\n", "end without"),
            ("set a b\n", "outside"),
            ("config a\n set b\nend\n", "needs a value"),
            ("config a\n", "unexpected end of input"),
            ("config a\n edit x\n  set k v\n", "unexpected end of input"),
            ("frobnicate\n", "unknown command"),
            ("config a edit 1 set b c next end\n", "own line"),
            ("config a\n edit x y\nend\n", "one name"),
        ] {
            let mut d = Vec::new();
            let _ = parse_tree(text, &mut d);
            let found = d.iter().any(|x| match x {
                SyntaxDiag::Error(_, k) => k.to_string().contains(needle),
                _ => false,
            });
            assert!(found, "{text:?}: {d:?}");
        }
    }

    #[test]
    fn depth_is_bounded() {
        let text = "config a\n".repeat(10_000);
        let mut d = Vec::new();
        let _ = parse_tree(&text, &mut d);
        assert!(d
            .iter()
            .any(|x| matches!(x, SyntaxDiag::Error(_, ErrorKind::TooDeep { .. }))));
    }
}
