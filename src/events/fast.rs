//! A fast path for parsing interactions: the rebuild's replay and a
//! sessions warm-up read tens of millions of them, and the typed serde pass
//! was ~250 ns of a ~100-byte message, a third of the replay thread.
//!
//! [`interaction`] accepts only a plain subset of JSON: an object with
//! exactly the five fields (in any order, each once), string values without
//! escapes or control characters, `event_time` a plain non-negative integer
//! of at most 18 digits, `kind` one of the four names. For anything else it
//! returns `None` and the caller falls back to serde, which then accepts or
//! names the reason as before. Whatever it accepts, serde accepts with the
//! same fields (checked against serde on mutated messages in the tests), so
//! the two paths cannot disagree.

use std::borrow::Cow;

use super::{InteractionKind, InteractionRef};

struct Scan<'a> {
    /// The whole message, valid UTF-8 (checked once: a string between two
    /// quotes, which are ASCII, is then valid too).
    t: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.t.as_bytes()
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.at) {
            self.at += 1;
        }
    }

    fn next(&mut self) -> Option<u8> {
        let c = *self.bytes().get(self.at)?;
        self.at += 1;
        Some(c)
    }

    /// The value of the first of `table`'s quoted literals the text goes
    /// on with, taken; `None` if it goes on with none of them (a name
    /// spelled any other way: an escape, an unknown field or kind).
    fn one_of<T: Copy>(&mut self, table: &[(&[u8], T)]) -> Option<T> {
        let rest = self.bytes().get(self.at..)?;
        let (lit, v) = table.iter().find(|(lit, _)| rest.starts_with(lit))?;
        self.at += lit.len();
        Some(*v)
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        if self.next()? != b'"' {
            return None;
        }
        let start = self.at;
        let rest = self.bytes().get(start..)?;
        let len = stop(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        self.t.get(start..start + len)
    }

    /// A non-negative integer without a leading zero, a fraction or an
    /// exponent, of at most 18 digits (always within i64).
    fn int(&mut self) -> Option<i64> {
        let start = self.at;
        let mut n: i64 = 0;
        while let Some(c @ b'0'..=b'9') = self.bytes().get(self.at) {
            if self.at - start == 18 {
                return None;
            }
            n = n * 10 + i64::from(c - b'0');
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (self.bytes()[start] == b'0' && digits > 1) {
            return None;
        }
        match self.bytes().get(self.at) {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(n),
        }
    }
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` (little-endian) that end a plain string: `"`, `\\` or
/// a control character, as their high bits. Exact up to the first one (a
/// borrow only starts at a byte that matches), which is all that is read.
fn stops(w: u64) -> u64 {
    let quote = w ^ (LO * u64::from(b'"'));
    let slash = w ^ (LO * u64::from(b'\\'));
    ((quote.wrapping_sub(LO) & !quote)
        | (slash.wrapping_sub(LO) & !slash)
        | (w.wrapping_sub(LO * 0x20) & !w))
        & HI
}

/// Where the first `"`, `\\` or control character of `b` is, eight bytes
/// at a time.
fn stop(b: &[u8]) -> Option<usize> {
    let mut words = b.chunks_exact(8);
    let mut at = 0;
    for w in words.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        let m = stops(u64::from_le_bytes(word));
        if m != 0 {
            return Some(at + (m.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let tail = words.remainder();
    tail.iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|i| at + i)
}

const KEYS: &[(&[u8], Field)] = &[
    (br#""event_id""#, Field::EventId),
    (br#""user_id""#, Field::UserId),
    (br#""item_id""#, Field::ItemId),
    (br#""kind""#, Field::Kind),
    (br#""event_time""#, Field::EventTime),
];

const KINDS: &[(&[u8], InteractionKind)] = &[
    (br#""view""#, InteractionKind::View),
    (br#""click""#, InteractionKind::Click),
    (br#""add_to_cart""#, InteractionKind::AddToCart),
    (br#""purchase""#, InteractionKind::Purchase),
];

#[derive(Clone, Copy)]
enum Field {
    EventId,
    UserId,
    ItemId,
    Kind,
    EventTime,
}

/// The interaction in `raw` if it is in the plain form described in the
/// module documentation; `None` means "ask serde", not "invalid".
pub(super) fn interaction(raw: &[u8]) -> Option<InteractionRef<'_>> {
    let t = std::str::from_utf8(raw).ok()?;
    let mut s = Scan { t, at: 0 };
    let (mut event_id, mut user_id, mut item_id) = (None, None, None);
    let (mut kind_of, mut event_time) = (None, None);
    s.ws();
    if s.next()? != b'{' {
        return None;
    }
    loop {
        s.ws();
        let key = s.one_of(KEYS)?;
        s.ws();
        if s.next()? != b':' {
            return None;
        }
        s.ws();
        match key {
            Field::EventId if event_id.is_none() => event_id = Some(s.string()?),
            Field::UserId if user_id.is_none() => user_id = Some(s.string()?),
            Field::ItemId if item_id.is_none() => item_id = Some(s.string()?),
            Field::Kind if kind_of.is_none() => kind_of = Some(s.one_of(KINDS)?),
            Field::EventTime if event_time.is_none() => event_time = Some(s.int()?),
            // Repeated: serde decides.
            _ => return None,
        }
        s.ws();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.ws();
    if s.at != raw.len() {
        return None;
    }
    Some(InteractionRef {
        event_id: Cow::Borrowed(event_id?),
        user_id: Cow::Borrowed(user_id?),
        item_id: Cow::Borrowed(item_id?),
        kind: kind_of?,
        event_time: event_time?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Rng;

    fn serde(raw: &[u8]) -> Option<InteractionRef<'_>> {
        serde_json::from_slice(raw).ok()
    }

    fn same(a: &InteractionRef<'_>, b: &InteractionRef<'_>) -> bool {
        a.event_id == b.event_id
            && a.user_id == b.user_id
            && a.item_id == b.item_id
            && a.kind == b.kind
            && a.event_time == b.event_time
    }

    /// Whatever the fast path accepts, serde accepts with the same fields.
    fn agrees(raw: &[u8]) -> bool {
        match interaction(raw) {
            None => false,
            Some(f) => {
                let s = serde(raw).unwrap_or_else(|| {
                    panic!(
                        "fast path accepted what serde rejects: {:?}",
                        String::from_utf8_lossy(raw)
                    )
                });
                assert!(
                    same(&f, &s),
                    "fast path and serde differ on {:?}: {f:?} / {s:?}",
                    String::from_utf8_lossy(raw)
                );
                true
            }
        }
    }

    const PLAIN: &str = r#"{"event_id":"ev-1","user_id":"user-634099","item_id":"item-47653","kind":"add_to_cart","event_time":1764000000022}"#;

    #[test]
    fn the_form_our_producers_write_takes_the_fast_path() {
        assert!(agrees(PLAIN.as_bytes()));
        let i = interaction(PLAIN.as_bytes()).unwrap();
        assert_eq!(i.user_id, "user-634099");
        assert_eq!(i.kind, InteractionKind::AddToCart);
        assert_eq!(i.event_time, 1_764_000_000_022);
        // What `generate` writes, every kind.
        for e in crate::generate::InteractionGenerator::new(3, 100, 50, 1_764_000_000_000, 10.0)
            .take(500)
        {
            let raw = serde_json::to_vec(&e).unwrap();
            assert!(agrees(&raw), "{}", String::from_utf8_lossy(&raw));
        }
        // The longest event time it reads itself (18 digits).
        assert!(agrees(
            br#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":999999999999999999}"#
        ));
        // Whitespace and another field order.
        assert!(agrees(
            b" {\n \"kind\" : \"view\",\t\"event_time\":946684800000 ,\"item_id\":\"i\",\"user_id\":\"u\",\"event_id\":\"\xc3\xa9\"}\r\n"
        ));
    }

    #[test]
    fn anything_else_is_left_to_serde() {
        for raw in [
            // serde accepts these, the fast path leaves them.
            r#"{"event_id":"e\u0031","user_id":"u","item_id":"i","kind":"view","event_time":1}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1,"extra":2}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":-1}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1234567890123456789}"#,
            // serde rejects these.
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1.5}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1e3}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":012}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":99999999999999999999}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"View","event_time":1}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":"1"}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view"}"#,
            r#"{"event_id":"e","user_id":"u","user_id":"v","item_id":"i","kind":"view","event_time":1}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1} x"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1,}"#,
            r#"{"event_id":"e","user_id":7,"item_id":"i","kind":"view","event_time":1}"#,
            r#"{"event_id":"e","user_id":"u","item_id":"i","kind":"view","event_time":1"#,
            "{\"event_id\":\"e\",\"user_id\":\"u\x01\",\"item_id\":\"i\",\"kind\":\"view\",\"event_time\":1}",
            r#"[]"#,
            r#"{}"#,
            "",
        ] {
            assert!(interaction(raw.as_bytes()).is_none(), "{raw}");
        }
        // Invalid UTF-8 in a value.
        let mut raw = PLAIN.as_bytes().to_vec();
        raw[15] = 0xff;
        assert!(interaction(&raw).is_none());
        assert!(serde(&raw).is_none());
    }

    /// Random edits of valid messages: the fast path never accepts what
    /// serde rejects or reads it differently, and it still takes most of
    /// the edits serde accepts (so it is in use, not always declining).
    #[test]
    fn it_agrees_with_serde_on_mutated_messages() {
        const ALPHABET: &[u8] =
            b"{}[]\":,\\ 0123456789-.eE+tfnu\x00\x1f\x7f\xc3\xa9\xff abcdefghijklmnopqrstuvwxyz_";
        let mut rng = Rng::new(11);
        let bases: Vec<Vec<u8>> =
            crate::generate::InteractionGenerator::new(4, 50, 20, 1_764_000_000_000, 10.0)
                .take(64)
                .map(|e| serde_json::to_vec(&e).unwrap())
                .collect();
        let (mut fast, mut serde_ok, mut tried) = (0, 0, 0);
        for n in 0..200_000 {
            let mut raw = bases[n % bases.len()].clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(raw.len() + 1);
                let c = ALPHABET[rng.below(ALPHABET.len())];
                match rng.below(4) {
                    0 if at < raw.len() => raw[at] = c,
                    1 => raw.insert(at, c),
                    2 if at < raw.len() => {
                        raw.remove(at);
                    }
                    _ => raw.truncate(at),
                }
            }
            tried += 1;
            if agrees(&raw) {
                fast += 1;
            }
            if serde(&raw).is_some() {
                serde_ok += 1;
            }
        }
        assert!(
            serde_ok > 5_000,
            "too few valid edits: {serde_ok} of {tried}"
        );
        assert!(
            fast * 10 >= serde_ok * 9,
            "the fast path took {fast} of the {serde_ok} edits serde accepts"
        );
    }

    #[test]
    fn the_word_scan_finds_the_first_stop_byte() {
        let slow = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
        let mut rng = Rng::new(7);
        for _ in 0..100_000 {
            let len = rng.below(40);
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                // Mostly plain bytes, so stop bytes come late too.
                b.push(match rng.below(24) {
                    0 => b'"',
                    1 => b'\\',
                    2 => rng.below(0x20) as u8,
                    3..=5 => 0x80 + rng.below(0x80) as u8,
                    _ => 0x20 + rng.below(0x60) as u8,
                });
            }
            assert_eq!(stop(&b), slow(&b), "{b:?}");
            // Long plain runs before the stop byte.
            let mut long = vec![b'a'; rng.below(30)];
            long.extend_from_slice(&b);
            assert_eq!(stop(&long), slow(&long), "{long:?}");
        }
    }
}
