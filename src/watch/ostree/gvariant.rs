//! A small, bounded reader for the one GVariant shape the agent needs: the `a{sv}` that
//! libostree writes to `/run/ostree/staged-deployment`, whose values are strings, booleans and
//! one nested `a{sv}`.
//!
//! It follows the GVariant serialisation format (the one glib's `g_variant_get_data` produces):
//! - strings are their bytes plus a NUL;
//! - a variant `v` is its value's bytes, a NUL, then the value's type string;
//! - containers of variable-sized children end with a table of framing offsets, each the end
//!   of one child, all of one width: 1, 2, 4 or 8 bytes, the smallest that can address the
//!   whole container; numbers are in the machine's byte order (glib writes native order);
//! - an array's table lists every element's end in order; a `{sv}` dict entry stores only the
//!   end of its key (the value runs to the table), and the value starts on an 8-byte boundary
//!   because a variant is 8-aligned; so does every entry of the array.
//!
//! Every offset is checked against the bytes it points into, so hostile input gives an error,
//! never a panic or a large allocation.

/// Why the bytes are not the expected GVariant.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct GVariantError(String);

fn malformed(what: impl Into<String>) -> GVariantError {
    GVariantError(what.into())
}

/// A `v` split into its type string and the serialised value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant<'a> {
    /// The value's GVariant type string, e.g. `s`, `b` or `a{sv}`.
    pub type_string: &'a str,
    /// The value's serialised bytes, without the NUL and the type string that follow them.
    pub data: &'a [u8],
}

impl<'a> Variant<'a> {
    /// Split a serialised `v`: the value, a NUL, then its type string (which has no NUL).
    pub fn parse(data: &'a [u8]) -> Result<Self, GVariantError> {
        let nul = data
            .iter()
            .rposition(|&b| b == 0)
            .ok_or_else(|| malformed("variant has no type string separator"))?;
        let type_string = std::str::from_utf8(&data[nul + 1..])
            .map_err(|_| malformed("variant type string is not UTF-8"))?;
        if type_string.is_empty() {
            return Err(malformed("variant type string is empty"));
        }
        Ok(Variant {
            type_string,
            data: &data[..nul],
        })
    }

    /// The value as a string (`s`).
    pub fn as_str(&self) -> Result<&'a str, GVariantError> {
        self.expect_type("s")?;
        string(self.data)
    }

    /// The value as a boolean (`b`).
    pub fn as_bool(&self) -> Result<bool, GVariantError> {
        self.expect_type("b")?;
        match self.data {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err(malformed("boolean is not a single 0 or 1 byte")),
        }
    }

    /// The value as a vardict (`a{sv}`).
    pub fn as_vardict(&self) -> Result<Vec<(&'a str, Variant<'a>)>, GVariantError> {
        self.expect_type("a{sv}")?;
        vardict(self.data)
    }

    fn expect_type(&self, expected: &str) -> Result<(), GVariantError> {
        if self.type_string == expected {
            Ok(())
        } else {
            Err(malformed(format!(
                "expected a value of type '{expected}', found type '{}'",
                self.type_string
            )))
        }
    }
}

/// A serialised `s`: UTF-8 bytes, NUL-terminated, no NUL inside.
pub fn string(data: &[u8]) -> Result<&str, GVariantError> {
    let (last, text) = data
        .split_last()
        .ok_or_else(|| malformed("string is empty (not even its NUL terminator)"))?;
    if *last != 0 || text.contains(&0) {
        return Err(malformed("string is not NUL-terminated or holds a NUL"));
    }
    std::str::from_utf8(text).map_err(|_| malformed("string is not UTF-8"))
}

/// A serialised `a{sv}`, as (key, value) pairs in file order.
pub fn vardict(data: &[u8]) -> Result<Vec<(&str, Variant<'_>)>, GVariantError> {
    let mut entries = Vec::new();
    for entry in variable_array(data, 8)? {
        // {sv}: key, NUL, padding to 8, variant, then one framing offset (the key's end).
        let width = offset_width(entry.len());
        let table = entry
            .len()
            .checked_sub(width)
            .ok_or_else(|| malformed("dict entry is shorter than its framing offset"))?;
        let key_end = read_offset(&entry[table..])?;
        if key_end > table {
            return Err(malformed("dict entry key runs past the entry"));
        }
        let key = string(&entry[..key_end])?;
        let value_start = align(key_end, 8);
        if value_start > table {
            return Err(malformed("dict entry has no room for its value"));
        }
        entries.push((key, Variant::parse(&entry[value_start..table])?));
    }
    Ok(entries)
}

/// The value of `key` in a vardict, if present (the last one wins, as in glib's lookup of
/// a non-normal dict).
pub fn lookup<'a>(dict: &[(&'a str, Variant<'a>)], key: &str) -> Option<Variant<'a>> {
    dict.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The elements of an array whose elements have variable size and `alignment`.
fn variable_array(data: &[u8], alignment: usize) -> Result<Vec<&[u8]>, GVariantError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let width = offset_width(data.len());
    let table_start = read_offset(&data[data.len() - width.min(data.len())..])?;
    if table_start > data.len() || !(data.len() - table_start).is_multiple_of(width) {
        return Err(malformed("array framing offsets do not fit the array"));
    }
    let mut elements = Vec::with_capacity((data.len() - table_start) / width);
    let mut start = 0;
    for slot in data[table_start..].chunks_exact(width) {
        let end = read_offset(slot)?;
        if end < start || end > table_start {
            return Err(malformed(
                "array element offset out of order or out of range",
            ));
        }
        elements.push(&data[start..end]);
        start = align(end, alignment);
    }
    Ok(elements)
}

/// Width of one framing offset in a container of `size` bytes.
fn offset_width(size: usize) -> usize {
    match size as u64 {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

fn read_offset(bytes: &[u8]) -> Result<usize, GVariantError> {
    let value = match *bytes {
        [a] => u64::from(a),
        [a, b] => u64::from(u16::from_ne_bytes([a, b])),
        [a, b, c, d] => u64::from(u32::from_ne_bytes([a, b, c, d])),
        [a, b, c, d, e, f, g, h] => u64::from_ne_bytes([a, b, c, d, e, f, g, h]),
        _ => return Err(malformed("container too short for its framing offset")),
    };
    usize::try_from(value).map_err(|_| malformed("framing offset does not fit in memory"))
}

fn align(offset: usize, alignment: usize) -> usize {
    offset.div_ceil(alignment) * alignment
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"name": <"abc.0">}` as glib serialises it: key "name\0" (5 bytes), 3 bytes of padding,
    /// the variant "abc.0\0" + "\0s" (8 bytes), the key's end (5); then the array's table: the
    /// entry's end (17).
    const ONE_ENTRY: &[u8] = b"name\0\0\0\0abc.0\0\0s\x05\x11";

    #[test]
    fn reads_a_one_entry_vardict() {
        let dict = vardict(ONE_ENTRY).unwrap();
        assert_eq!(dict.len(), 1);
        assert_eq!(dict[0].0, "name");
        assert_eq!(dict[0].1.as_str().unwrap(), "abc.0");
    }

    #[test]
    fn empty_vardict_is_empty() {
        assert!(vardict(b"").unwrap().is_empty());
    }

    #[test]
    fn hostile_offsets_are_errors_not_panics() {
        // Every truncation and every single-byte corruption of a valid dict.
        for cut in 0..ONE_ENTRY.len() {
            let _ = vardict(&ONE_ENTRY[..cut]);
        }
        for i in 0..ONE_ENTRY.len() {
            for byte in [0u8, 1, 7, 8, 0x10, 0x11, 0x7f, 0xff] {
                let mut bytes = ONE_ENTRY.to_vec();
                bytes[i] = byte;
                if let Ok(dict) = vardict(&bytes) {
                    for (_, value) in dict {
                        let _ = value.as_str();
                        let _ = value.as_vardict();
                    }
                }
            }
        }
        assert!(vardict(b"\xff").is_err());
        assert!(vardict(b"x\x00\x05").is_err());
    }

    #[test]
    fn type_mismatch_names_both_types() {
        let dict = vardict(ONE_ENTRY).unwrap();
        let err = dict[0].1.as_vardict().unwrap_err();
        assert!(err.to_string().contains("'a{sv}'"), "{err}");
        assert!(err.to_string().contains("'s'"), "{err}");
    }

    #[test]
    fn strings_need_their_terminator() {
        assert_eq!(string(b"abc\0").unwrap(), "abc");
        assert!(string(b"abc").is_err());
        assert!(string(b"a\0c\0").is_err());
        assert!(string(b"").is_err());
    }

    #[test]
    fn offset_width_follows_container_size() {
        assert_eq!(offset_width(0xff), 1);
        assert_eq!(offset_width(0x100), 2);
        assert_eq!(offset_width(0x1_0000), 4);
    }
}
