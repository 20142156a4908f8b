//! The workload language of the test guest: its parser and its program form.
//!
//! The guest runs a workload (the boot workload from [`crate::BootInfo::cmdline`],
//! later run-time commands from the [`crate::ControlPage`]) to put its memory into a
//! known state that reclamation then has to preserve. The parser lives here rather
//! than in the guest so the VMM can refuse a bad workload with a clear message before
//! it boots anything. It is `no_std` and allocation-free: a [`Program`] is a fixed
//! array of [`Step`]s in which `repeat` is flattened (the body follows its header).
//!
//! ```text
//! program  := step? (';' step?)*          (a '}' ends a repeat without a ';')
//! step     := alloc SIZE KIND | touch SIZE | read SIZE | verify | free SIZE ['zero']
//!           | work SIZE DURATION ['write'] | idle DURATION | spin N
//!           | repeat N '{' program '}' | for DURATION '{' program '}' | exit CODE | fault
//! SIZE     := digits [K|M|G]                bytes, binary units, rounded up to pages, > 0
//! KIND     := zero | dup | shared:SEED | unique
//! DURATION := digits [us|ms|s]              a plain number means milliseconds
//! ```
//!
//! Keywords are lowercase; whitespace between tokens is free; `;`, `{` and `}` need no
//! whitespace around them. Numbers are decimal; a seed may also be `0x` hexadecimal.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;

/// Most steps a [`Program`] holds (a `repeat` header counts as one). A full
/// [`crate::CMDLINE_MAX`] boot workload of the shortest steps fits.
pub const MAX_STEPS: usize = 1024;
/// Deepest nesting of `repeat` and `for`.
pub const MAX_DEPTH: usize = 8;

/// What an `alloc` step writes into each page (see [`crate::content`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Zero-filled (written explicitly, so the pages become resident).
    Zero,
    /// The same non-zero page everywhere, in every VM.
    Dup,
    /// Derived from the seed and the page's index in its allocation: identical
    /// across VMs that use the same seed.
    Shared(u64),
    /// Pseudo-random, different in every VM (and every allocation).
    Unique,
}

/// One step of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Allocate and fill `pages` pages.
    Alloc {
        /// Page count.
        pages: u64,
        /// Their content.
        kind: Kind,
    },
    /// Rewrite `pages` allocated pages, round-robin, with new private content.
    Touch {
        /// Page count.
        pages: u64,
    },
    /// Read (and check) the first `pages` allocated pages without writing them: a
    /// read-only working set.
    Read {
        /// Page count.
        pages: u64,
    },
    /// Check every allocated page.
    Verify,
    /// Free the `pages` most recently allocated pages.
    Free {
        /// Page count.
        pages: u64,
        /// Write zeros into them first (as Windows' zero page thread does).
        zero: bool,
    },
    /// For `us` microseconds, one page at a time, read (and check) or rewrite a
    /// pseudo-random page among the first `pages` allocated ones; reports the
    /// operations per second: the guest's throughput over a working set.
    Work {
        /// Working set, in pages.
        pages: u64,
        /// Duration in microseconds.
        us: u64,
        /// Rewrite each page (as `touch`) instead of reading it.
        write: bool,
    },
    /// Sleep (halt) for `us` microseconds.
    Idle {
        /// Duration in microseconds.
        us: u64,
    },
    /// A pure compute loop.
    Spin {
        /// Loop iterations.
        iterations: u64,
    },
    /// Run the next `body` steps `count` times.
    Repeat {
        /// Iterations.
        count: u32,
        /// Number of steps of the body, which follow this one (nested ones included).
        body: u32,
    },
    /// Run the next `body` steps again and again until `us` microseconds have passed
    /// since the loop started (checked before each iteration): working sets that
    /// change at given times.
    For {
        /// Duration in microseconds.
        us: u64,
        /// Number of steps of the body, which follow this one (nested ones included).
        body: u32,
    },
    /// End the VM with this exit code.
    Exit {
        /// The code (0..=255).
        code: u8,
    },
    /// Read an unmapped address: tests how the guest reports a CPU exception.
    Fault,
}

/// A step's keyword: what a step is, without its argument. The `op` of a step's
/// result line ([`crate::step::StepResult`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `alloc`.
    Alloc,
    /// `touch`.
    Touch,
    /// `read`.
    Read,
    /// `verify`.
    Verify,
    /// `free`.
    Free,
    /// `work`.
    Work,
    /// `idle`.
    Idle,
    /// `spin`.
    Spin,
    /// `repeat` (never reported: its body's steps are).
    Repeat,
    /// `for` (never reported: its body's steps are).
    For,
    /// `exit`.
    Exit,
    /// `fault`.
    Fault,
}

impl Op {
    /// The keyword as written in a workload.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Alloc => "alloc",
            Op::Touch => "touch",
            Op::Read => "read",
            Op::Verify => "verify",
            Op::Free => "free",
            Op::Work => "work",
            Op::Idle => "idle",
            Op::Spin => "spin",
            Op::Repeat => "repeat",
            Op::For => "for",
            Op::Exit => "exit",
            Op::Fault => "fault",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Step {
    /// The step's keyword.
    pub fn op(&self) -> Op {
        match self {
            Step::Alloc { .. } => Op::Alloc,
            Step::Touch { .. } => Op::Touch,
            Step::Read { .. } => Op::Read,
            Step::Verify => Op::Verify,
            Step::Free { .. } => Op::Free,
            Step::Work { .. } => Op::Work,
            Step::Idle { .. } => Op::Idle,
            Step::Spin { .. } => Op::Spin,
            Step::Repeat { .. } => Op::Repeat,
            Step::For { .. } => Op::For,
            Step::Exit { .. } => Op::Exit,
            Step::Fault => Op::Fault,
        }
    }

    /// The step's argument in canonical form (`128M unique`, `500us`, `16M 2s write`),
    /// if it has one.
    pub fn arg(&self) -> Option<Arg> {
        match *self {
            Step::Verify | Step::Fault => None,
            step => Some(Arg(step)),
        }
    }
}

/// Displays a step's argument; see [`Step::arg`].
#[derive(Clone, Copy, Debug)]
pub struct Arg(Step);

/// Longest argument of a parsed step in canonical form, in bytes: `work` of the
/// largest size in KiB for the largest duration, writing (`18014398509481980K
/// 18446744073709551615us write`), is 47.
pub const ARG_MAX: usize = 48;

impl Arg {
    /// The argument as text in `buf`, without allocating (the guest has no heap).
    /// Text longer than [`ARG_MAX`] (no parsed step has one) is cut short.
    pub fn to_str(self, buf: &mut [u8; ARG_MAX]) -> &str {
        let mut out = Cursor { buf, len: 0 };
        let _ = fmt::write(&mut out, format_args!("{self}"));
        let len = out.len;
        // Only whole characters are copied, so the bytes are UTF-8.
        core::str::from_utf8(&buf[..len]).unwrap_or_default()
    }
}

/// Formats into a fixed buffer, stopping at the first piece that does not fit.
struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Step::Alloc { pages, kind } => {
                write!(f, "{} ", Size(pages))?;
                match kind {
                    Kind::Zero => f.write_str("zero"),
                    Kind::Dup => f.write_str("dup"),
                    Kind::Shared(seed) => write!(f, "shared:{seed}"),
                    Kind::Unique => f.write_str("unique"),
                }
            }
            Step::Touch { pages } | Step::Read { pages } | Step::Free { pages, zero: false } => {
                write!(f, "{}", Size(pages))
            }
            Step::Free { pages, zero: true } => write!(f, "{} zero", Size(pages)),
            Step::Work { pages, us, write } => {
                write!(f, "{} {}", Size(pages), Duration(us))?;
                if write {
                    f.write_str(" write")?;
                }
                Ok(())
            }
            Step::Idle { us } | Step::For { us, .. } => write!(f, "{}", Duration(us)),
            Step::Spin { iterations } => write!(f, "{iterations}"),
            Step::Repeat { count, .. } => write!(f, "{count}"),
            Step::Exit { code } => write!(f, "{code}"),
            Step::Verify | Step::Fault => Ok(()),
        }
    }
}

/// Microseconds shown in the largest exact unit (`2s`, `100ms`, `7us`; `0ms`).
struct Duration(u64);

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            us if us % 1_000_000 == 0 && us > 0 => write!(f, "{}s", us / 1_000_000),
            us if us % 1000 == 0 => write!(f, "{}ms", us / 1000),
            us => write!(f, "{us}us"),
        }
    }
}

/// A page count shown as the largest exact binary unit (`4K`, `128M`, `2G`).
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // In KiB: a page count times 4 cannot overflow (pages <= u64::MAX / 4096 + 1).
        let kib = self.0 * (PAGE_SIZE >> 10);
        let (div, unit) =
            [(1 << 20, "G"), (1 << 10, "M")].into_iter().find(|&(div, _)| kib % div == 0).unwrap_or((1, "K"));
        write!(f, "{}{unit}", kib / div)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op().as_str())?;
        match self.arg() {
            Some(arg) => write!(f, " {arg}"),
            None => Ok(()),
        }
    }
}

/// A parsed workload: steps in source order, each `repeat` followed by its body.
#[derive(Clone)]
pub struct Program {
    steps: [Step; MAX_STEPS],
    len: usize,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.steps()).finish()
    }
}

impl Program {
    /// Parses a workload.
    pub fn parse(text: &str) -> Result<Program, ParseError<'_>> {
        let mut parser =
            Parser { lexer: Lexer { text, pos: 0 }, program: Program { steps: [Step::Verify; MAX_STEPS], len: 0 } };
        parser.block(0)?;
        Ok(parser.program)
    }

    /// The steps, flattened (see [`Step::Repeat`]).
    pub fn steps(&self) -> &[Step] {
        &self.steps[..self.len]
    }
}

/// Shows the program in canonical form (it parses back to the same program).
impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_block(self.steps(), f)
    }
}

fn fmt_block(steps: &[Step], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut i = 0;
    while i < steps.len() {
        if i > 0 {
            f.write_str("; ")?;
        }
        write!(f, "{}", steps[i])?;
        if let Step::Repeat { body, .. } | Step::For { body, .. } = steps[i] {
            let body = &steps[i + 1..i + 1 + body as usize];
            f.write_str(" { ")?;
            fmt_block(body, f)?;
            f.write_str(" }")?;
            i += body.len();
        }
        i += 1;
    }
    Ok(())
}

/// Why a workload did not parse: what was wrong, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseError<'a> {
    /// Byte offset of the offending token in the text.
    pub offset: usize,
    /// The offending token (empty at the end of the text).
    pub token: &'a str,
    /// What was expected or wrong.
    pub msg: &'static str,
}

impl fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.token.is_empty() {
            write!(f, "{} at the end of the workload", self.msg)
        } else {
            write!(f, "{} at byte {}: '{}'", self.msg, self.offset, self.token)
        }
    }
}

/// A token: a word, or one of the punctuation characters `;`, `{`, `}`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    Punct(u8),
    End,
}

struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    /// The next token and its offset, without consuming it.
    fn peek(&self) -> (Token<'a>, usize) {
        let bytes = self.text.as_bytes();
        let start =
            bytes[self.pos..].iter().position(|b| !b.is_ascii_whitespace()).map_or(bytes.len(), |n| self.pos + n);
        match bytes.get(start) {
            None => (Token::End, start),
            Some(&c @ (b';' | b'{' | b'}')) => (Token::Punct(c), start),
            Some(_) => {
                let len = bytes[start..]
                    .iter()
                    .position(|&b| b.is_ascii_whitespace() || matches!(b, b';' | b'{' | b'}'))
                    .unwrap_or(bytes.len() - start);
                (Token::Word(&self.text[start..start + len]), start)
            }
        }
    }

    /// Consumes and returns the next token.
    fn next(&mut self) -> (Token<'a>, usize) {
        let (tok, start) = self.peek();
        self.pos = start
            + match tok {
                Token::Word(w) => w.len(),
                Token::Punct(_) => 1,
                Token::End => 0,
            };
        (tok, start)
    }
}

struct Parser<'a> {
    lexer: Lexer<'a>,
    program: Program,
}

impl<'a> Parser<'a> {
    fn error(&self, offset: usize, token: Token<'a>, msg: &'static str) -> ParseError<'a> {
        let token = match token {
            Token::Word(w) => w,
            Token::Punct(_) => &self.lexer.text[offset..offset + 1],
            Token::End => "",
        };
        ParseError { offset, token, msg }
    }

    /// Parses steps until the end of the text (`depth == 0`) or the `}` closing a
    /// repeat body (consumed).
    fn block(&mut self, depth: usize) -> Result<(), ParseError<'a>> {
        loop {
            let (tok, at) = self.lexer.next();
            match tok {
                Token::Punct(b';') => {}
                Token::Punct(b'}') if depth > 0 => return Ok(()),
                Token::Punct(b'}') => return Err(self.error(at, tok, "'}' without a repeat or for")),
                Token::Punct(_) => return Err(self.error(at, tok, "'{' without a repeat or for")),
                Token::End if depth > 0 => return Err(self.error(at, tok, "missing '}'")),
                Token::End => return Ok(()),
                Token::Word(word) => {
                    if self.step(word, at, depth)? {
                        let (next, at) = self.lexer.peek();
                        if let Token::Word(_) = next {
                            return Err(self.error(at, next, "expected ';' between steps"));
                        }
                    }
                }
            }
        }
    }

    /// Parses the step starting with keyword `word`; returns whether it needs a
    /// separator before the next step (every step but `repeat` and `for`).
    fn step(&mut self, word: &'a str, at: usize, depth: usize) -> Result<bool, ParseError<'a>> {
        let step = match word {
            "alloc" => {
                let pages = self.size()?;
                Step::Alloc { pages, kind: self.kind()? }
            }
            "touch" => Step::Touch { pages: self.size()? },
            "read" => Step::Read { pages: self.size()? },
            "verify" => Step::Verify,
            "free" => Step::Free { pages: self.size()?, zero: self.flag("zero") },
            "work" => {
                let pages = self.size()?;
                let us = self.duration()?;
                Step::Work { pages, us, write: self.flag("write") }
            }
            "idle" => Step::Idle { us: self.duration()? },
            "spin" => Step::Spin { iterations: self.number("expected an iteration count")? },
            "exit" => {
                let (tok, at) = self.lexer.next();
                let code = word_of(tok).and_then(decimal).filter(|&c| c <= 255);
                Step::Exit { code: code.ok_or(self.error(at, tok, "expected an exit code 0..=255"))? as u8 }
            }
            "fault" => Step::Fault,
            "repeat" => {
                let (tok, count_at) = self.lexer.next();
                let count =
                    word_of(tok).and_then(decimal).ok_or(self.error(count_at, tok, "expected a repeat count"))?;
                let count = u32::try_from(count).map_err(|_| self.error(count_at, tok, "repeat count too large"))?;
                return self.body(Step::Repeat { count, body: 0 }, at, depth).map(|()| false);
            }
            "for" => {
                let us = self.duration()?;
                return self.body(Step::For { us, body: 0 }, at, depth).map(|()| false);
            }
            _ => {
                let msg = "unknown step (expected alloc, touch, read, verify, free, work, idle, spin, repeat, for, \
                           exit or fault)";
                return Err(self.error(at, Token::Word(word), msg));
            }
        };
        self.push(step, at, word)?;
        Ok(true)
    }

    /// Parses the `{ ... }` body of `header` (a `repeat` or `for` whose argument was
    /// read) and stores the header with its body's length.
    fn body(&mut self, header: Step, at: usize, depth: usize) -> Result<(), ParseError<'a>> {
        let word = header.op().as_str();
        if depth == MAX_DEPTH {
            return Err(self.error(at, Token::Word(word), "repeat or for nested too deeply (at most 8 levels)"));
        }
        let (tok, brace_at) = self.lexer.next();
        if tok != Token::Punct(b'{') {
            let msg = match header {
                Step::For { .. } => "expected '{' after the for duration",
                _ => "expected '{' after the repeat count",
            };
            return Err(self.error(brace_at, tok, msg));
        }
        let index = self.program.len;
        self.push(header, at, word)?;
        self.block(depth + 1)?;
        let len = (self.program.len - index - 1) as u32;
        self.program.steps[index] = match header {
            Step::For { us, .. } => Step::For { us, body: len },
            Step::Repeat { count, .. } => Step::Repeat { count, body: len },
            _ => unreachable!("only repeat and for have a body"),
        };
        Ok(())
    }

    /// Consumes the optional modifier `word` after a step's arguments.
    fn flag(&mut self, word: &str) -> bool {
        let present = self.lexer.peek().0 == Token::Word(word);
        if present {
            self.lexer.next();
        }
        present
    }

    fn push(&mut self, step: Step, at: usize, word: &'a str) -> Result<(), ParseError<'a>> {
        if self.program.len == MAX_STEPS {
            return Err(self.error(at, Token::Word(word), "too many steps (at most 1024)"));
        }
        self.program.steps[self.program.len] = step;
        self.program.len += 1;
        Ok(())
    }

    fn number(&mut self, msg: &'static str) -> Result<u64, ParseError<'a>> {
        let (tok, at) = self.lexer.next();
        word_of(tok).and_then(decimal).ok_or(self.error(at, tok, msg))
    }

    /// A size in pages.
    fn size(&mut self) -> Result<u64, ParseError<'a>> {
        let (tok, at) = self.lexer.next();
        let bytes = word_of(tok).and_then(|w| with_unit(w, &[("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("", 1)]));
        match bytes {
            Some(0) => Err(self.error(at, tok, "size must be greater than zero")),
            Some(b) => Ok(b.div_ceil(PAGE_SIZE)),
            None => Err(self.error(at, tok, "expected a size (bytes with an optional K, M or G suffix)")),
        }
    }

    /// A duration in microseconds.
    fn duration(&mut self) -> Result<u64, ParseError<'a>> {
        let (tok, at) = self.lexer.next();
        word_of(tok)
            .and_then(|w| with_unit(w, &[("us", 1), ("ms", 1000), ("s", 1_000_000), ("", 1000)]))
            .ok_or(self.error(at, tok, "expected a duration (500us, 100ms, 2s; a plain number is ms)"))
    }

    fn kind(&mut self) -> Result<Kind, ParseError<'a>> {
        let (tok, at) = self.lexer.next();
        let kind = match word_of(tok) {
            Some("zero") => Some(Kind::Zero),
            Some("dup") => Some(Kind::Dup),
            Some("unique") => Some(Kind::Unique),
            Some(w) => w.strip_prefix("shared:").and_then(seed).map(Kind::Shared),
            None => None,
        };
        kind.ok_or(self.error(at, tok, "expected a page kind: zero, dup, shared:SEED or unique"))
    }
}

fn word_of(tok: Token<'_>) -> Option<&str> {
    match tok {
        Token::Word(w) => Some(w),
        _ => None,
    }
}

/// A decimal `u64` (digits only).
fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A decimal or `0x` hexadecimal `u64`.
fn seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None => decimal(s),
    }
}

/// `digits` followed by one of `units` (checked in order, matched
/// case-insensitively), scaled by the unit's factor.
fn with_unit(word: &str, units: &[(&str, u64)]) -> Option<u64> {
    let digits = word.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = word.split_at(digits);
    let factor = units.iter().find(|(u, _)| u.eq_ignore_ascii_case(unit))?.1;
    decimal(number)?.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::ToString};

    use super::*;

    fn steps(text: &str) -> std::vec::Vec<Step> {
        Program::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}")).steps().to_vec()
    }

    fn error(text: &str) -> ParseError<'_> {
        Program::parse(text).expect_err(text)
    }

    #[test]
    fn every_step_kind() {
        assert_eq!(
            steps("alloc 128M unique; alloc 4096 zero; alloc 1K dup; alloc 2G shared:7; alloc 3 shared:0xff"),
            [
                Step::Alloc { pages: 32768, kind: Kind::Unique },
                Step::Alloc { pages: 1, kind: Kind::Zero },
                Step::Alloc { pages: 1, kind: Kind::Dup },
                Step::Alloc { pages: 1 << 19, kind: Kind::Shared(7) },
                Step::Alloc { pages: 1, kind: Kind::Shared(255) },
            ]
        );
        assert_eq!(
            steps("touch 8k; verify; free 4097; idle 500us; idle 100ms; idle 2s; idle 7; spin 100; exit 255; fault"),
            [
                Step::Touch { pages: 2 },
                Step::Verify,
                Step::Free { pages: 2, zero: false },
                Step::Idle { us: 500 },
                Step::Idle { us: 100_000 },
                Step::Idle { us: 2_000_000 },
                Step::Idle { us: 7000 },
                Step::Spin { iterations: 100 },
                Step::Exit { code: 255 },
                Step::Fault,
            ]
        );
    }

    #[test]
    fn working_set_steps() {
        assert_eq!(
            steps("read 64M; free 8K zero; free 4K;work 16M 2s; work 1M 500us write;for 3s{read 4M}"),
            [
                Step::Read { pages: 16384 },
                Step::Free { pages: 2, zero: true },
                Step::Free { pages: 1, zero: false },
                Step::Work { pages: 4096, us: 2_000_000, write: false },
                Step::Work { pages: 256, us: 500, write: true },
                Step::For { us: 3_000_000, body: 1 },
                Step::Read { pages: 1024 },
            ]
        );
        assert_eq!(error("read").msg, error("touch").msg);
        assert_eq!(error("work 16M").token, "");
        assert_eq!(error("work 16M 2s read").msg, "expected ';' between steps");
        assert_eq!(error("free 4K zeros").token, "zeros");
        assert_eq!(error("for { verify }").token, "{");
        assert_eq!(error("for 2s verify").msg, "expected '{' after the for duration");
        assert_eq!(error("for 2s { verify").msg, "missing '}'");
        let too_deep = "for 1s {".repeat(MAX_DEPTH + 1) + "verify" + &"}".repeat(MAX_DEPTH + 1);
        assert!(error(&too_deep).msg.contains("nested too deeply"));
    }

    #[test]
    fn whitespace_and_separators_are_free() {
        let want = [Step::Alloc { pages: 256, kind: Kind::Dup }, Step::Verify];
        assert_eq!(steps("alloc 1M dup;verify"), want);
        assert_eq!(steps("  \n\talloc   1M\n dup ;\n verify ;; ;"), want);
        assert_eq!(steps(";alloc 1M dup;verify;"), want);
        assert!(steps("").is_empty());
        assert!(steps(" ; ").is_empty());
    }

    #[test]
    fn repeat_is_flattened_and_nests() {
        assert_eq!(
            steps("repeat 3 { touch 4M; verify }; repeat 2{repeat 0{verify}spin 5} exit 0"),
            [
                Step::Repeat { count: 3, body: 2 },
                Step::Touch { pages: 1024 },
                Step::Verify,
                Step::Repeat { count: 2, body: 3 },
                Step::Repeat { count: 0, body: 1 },
                Step::Verify,
                Step::Spin { iterations: 5 },
                Step::Exit { code: 0 },
            ]
        );
        assert_eq!(steps("repeat 4 {}"), [Step::Repeat { count: 4, body: 0 }]);
        let deepest = "repeat 1 {".repeat(MAX_DEPTH) + "verify" + &"}".repeat(MAX_DEPTH);
        assert_eq!(steps(&deepest).len(), MAX_DEPTH + 1);
        let too_deep = "repeat 1 {".repeat(MAX_DEPTH + 1) + "verify" + &"}".repeat(MAX_DEPTH + 1);
        assert!(error(&too_deep).msg.contains("nested too deeply"));
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = error("alloc 1M unique; alocc 2M dup");
        assert_eq!((e.offset, e.token), (17, "alocc"));
        assert!(e.to_string().starts_with("unknown step"), "{e}");
        assert!(e.to_string().contains("at byte 17: 'alocc'"), "{e}");
        assert_eq!(error("alloc 0 zero").msg, "size must be greater than zero");
        assert_eq!(
            error("alloc 1M").to_string(),
            "expected a page kind: zero, dup, shared:SEED or unique at the end of the workload"
        );
        assert_eq!(error("alloc 1M shared:").token, "shared:");
        assert_eq!(error("alloc 1M shared:0x").token, "shared:0x");
        assert_eq!(error("alloc 1M shared:-1").token, "shared:-1");
        assert_eq!(error("alloc 1T unique").token, "1T");
        assert_eq!(error("alloc M unique").token, "M");
        assert_eq!(error("alloc 99999999999999999999 unique").token, "99999999999999999999");
        assert_eq!(error("alloc 17179869184G unique").token, "17179869184G", "overflow");
        assert_eq!(error("touch").msg, error("touch ;").msg);
        assert_eq!(error("idle 5h").token, "5h");
        assert_eq!(error("spin -3").token, "-3");
        assert_eq!(error("exit 256").token, "256");
        assert_eq!(error("exit").token, "");
        assert_eq!(error("verify spin 3").msg, "expected ';' between steps");
        assert_eq!(error("verify 3").token, "3");
        assert_eq!(error("repeat 2 verify").msg, "expected '{' after the repeat count");
        assert_eq!(error("repeat 5000000000 { verify }").msg, "repeat count too large");
        assert_eq!(error("repeat 2 { verify").msg, "missing '}'");
        assert_eq!(error("verify }").msg, "'}' without a repeat or for");
        assert_eq!(error("{ verify }").msg, "'{' without a repeat or for");
        assert_eq!(error("ALLOC 1M dup").token, "ALLOC", "keywords are lowercase");
    }

    #[test]
    fn step_limit() {
        let most = "verify;".repeat(MAX_STEPS);
        assert_eq!(steps(&most).len(), MAX_STEPS);
        let too_many = most + "spin 1";
        let e = error(&too_many);
        assert_eq!((e.msg, e.offset), ("too many steps (at most 1024)", 7 * MAX_STEPS));
        // The longest boot workload of the shortest steps fits.
        assert!(crate::CMDLINE_MAX / "exit 0;".len() <= MAX_STEPS);
    }

    #[test]
    fn canonical_form_round_trips() {
        let text = "alloc 4096K zero;alloc 3 dup; alloc 1536M shared:0x10; touch 1G; free 12K; \
                    idle 0; idle 1500; idle 3000000us; idle 7us; spin 9; repeat 2 { repeat 1 { verify } fault }; \
                    read 8192K; free 4K zero; work 2M 1000ms write; work 4K 3us; for 60000ms { read 4K; for 1 {} }; exit 3";
        let p = Program::parse(text).unwrap();
        let canonical = p.to_string();
        assert_eq!(
            canonical,
            "alloc 4M zero; alloc 4K dup; alloc 1536M shared:16; touch 1G; free 12K; idle 0ms; idle 1500ms; \
             idle 3s; idle 7us; spin 9; repeat 2 { repeat 1 { verify }; fault }; read 8M; free 4K zero; \
             work 2M 1s write; work 4K 3us; for 60s { read 4K; for 1ms {  } }; exit 3"
        );
        assert_eq!(Program::parse(&canonical).unwrap().steps(), p.steps());
        let alloc = p.steps()[2];
        assert_eq!((alloc.op(), format!("{}", alloc.arg().unwrap())), (Op::Alloc, "1536M shared:16".into()));
        assert!(Step::Verify.arg().is_none());
    }

    #[test]
    fn the_longest_argument_fits_its_buffer() {
        let text = "alloc 18446744073709547520 shared:18446744073709551615; idle 18446744073709551615us; \
                    work 18446744073709547520 18446744073709551615us write";
        let mut buf = [0; ARG_MAX];
        let alloc = steps(text)[0].arg().unwrap();
        assert_eq!(alloc.to_str(&mut buf), "18014398509481980K shared:18446744073709551615");
        let work = steps(text)[2].arg().unwrap();
        assert_eq!(work.to_str(&mut buf), "18014398509481980K 18446744073709551615us write");
        let idle = steps(text)[1].arg().unwrap();
        assert_eq!(idle.to_str(&mut buf), "18446744073709551615us");
        // Text that does not fit (no parsed step has any) is cut, never overrun.
        let huge = Step::Alloc { pages: (1 << 62) - 1, kind: Kind::Shared(u64::MAX) }.arg().unwrap();
        assert_eq!(huge.to_str(&mut buf), "18446744073709551612K shared:");
    }
}
