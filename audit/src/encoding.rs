//! Hex and base64 as this crate writes them, and values made safe for
//! messages. Hand-written so the crate needs no encoding dependency.

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Lowercase hex.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 15)]));
    }
    out
}

/// Parses hex (either case); `None` on odd length or a non-hex character.
pub(crate) fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let high = char::from(pair[0]).to_digit(16)?;
            let low = char::from(pair[1]).to_digit(16)?;
            u8::try_from(high << 4 | low).ok()
        })
        .collect()
}

pub(crate) fn is_lower_hex(byte: u8) -> bool {
    matches!(byte, b'0'..=b'9' | b'a'..=b'f')
}

/// Decodes hex written by this crate (lowercase only, exact length), so a
/// re-cased copy of a hash is not silently accepted as the same value.
pub(crate) fn decode_lower_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(is_lower_hex) {
        return None;
    }
    from_hex(text)?.try_into().ok()
}

/// Standard base64 with padding (RFC 4648 §4).
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let mut block = [0u8; 4];
        block[1..=chunk.len()].copy_from_slice(chunk);
        let n = u32::from_be_bytes(block);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (n >> (18 - 6 * i)) & 63;
                out.push(char::from(BASE64_ALPHABET[sextet as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64, ignoring ASCII whitespace (PEM line breaks).
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let symbols: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !symbols.len().is_multiple_of(4) {
        return None;
    }
    let quads = symbols.len() / 4;
    let mut out = Vec::with_capacity(quads * 3);
    for (index, quad) in symbols.chunks(4).enumerate() {
        let padding = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if padding > 2 || (padding > 0 && index + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &symbol in &quad[..4 - padding] {
            n = n << 6 | base64_value(symbol)?;
        }
        n <<= 6 * padding;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - padding]);
    }
    Some(out)
}

fn base64_value(symbol: u8) -> Option<u32> {
    let index = BASE64_ALPHABET.iter().position(|&b| b == symbol)?;
    u32::try_from(index).ok()
}

/// A value taken from a file, made safe and short for a message.
pub(crate) fn shown(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(48)
        .collect::<String>()
        .escape_debug()
        .collect();
    if text.chars().nth(48).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests;
