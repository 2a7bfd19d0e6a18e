//! Positions in text, for error messages that name a line.

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside a
/// character are clamped, never a panic.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns() {
        assert_eq!(line_column("a = 1\nb = é\n", 10), (2, 5));
        assert_eq!(line_column("é", 1), (1, 1), "inside a character");
        assert_eq!(line_column("x", 99), (1, 2), "past the end");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é = x", 3), (1, 3));
        assert_eq!(line_column("abc", 99), (1, 4));
    }
}
