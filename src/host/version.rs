//! One version comparator for the whole crate: kernel releases, boot entries, driver versions.

use std::cmp::Ordering;

/// Compare two versions the way systemd does (`strverscmp_improved`, the UAPI Version Format
/// Specification): `.`/`-`/`^`/`~` separate segments, numeric segments compare as numbers
/// (`6.1.0-10` > `6.1.0-9`), `~` sorts before everything (pre-releases), `-` before `.`.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    if a.is_empty() || b.is_empty() {
        return a.len().min(1).cmp(&b.len().min(1));
    }
    let valid = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'~' | b'-' | b'^' | b'.');
    let first = |s: &[u8]| s.first().copied().unwrap_or(0);
    loop {
        while !a.is_empty() && !valid(a[0]) {
            a = &a[1..];
        }
        while !b.is_empty() && !valid(b[0]) {
            b = &b[1..];
        }
        for sep in [b'~', 0, b'-', b'^', b'.'] {
            if sep == 0 {
                // After '~': a string that ends is older than one that goes on.
                if a.is_empty() || b.is_empty() {
                    return first(a).cmp(&first(b));
                }
                continue;
            }
            if first(a) == sep || first(b) == sep {
                let order = (first(a) != sep).cmp(&(first(b) != sep));
                if order.is_ne() {
                    return order;
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
        let (sa, sb);
        if first(a).is_ascii_digit() || first(b).is_ascii_digit() {
            let order = first(a).is_ascii_digit().cmp(&first(b).is_ascii_digit());
            if order.is_ne() {
                return order;
            }
            while first(a) == b'0' {
                a = &a[1..];
            }
            while first(b) == b'0' {
                b = &b[1..];
            }
            sa = a.iter().take_while(|c| c.is_ascii_digit()).count();
            sb = b.iter().take_while(|c| c.is_ascii_digit()).count();
            let order = sa.cmp(&sb).then_with(|| a[..sa].cmp(&b[..sb]));
            if order.is_ne() {
                return order;
            }
        } else {
            sa = a.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            sb = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let common = sa.min(sb);
            let order = a[..common].cmp(&b[..common]).then(sa.cmp(&sb));
            if order.is_ne() {
                return order;
            }
        }
        a = &a[sa..];
        b = &b[sb..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_systemd() {
        use Ordering::*;
        let cases = [
            ("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64", Greater),
            ("6.12.1", "6.1.99", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0.1", Less),
            ("123-9", "123.1-1", Less),
            ("1.0^post1", "1.0", Greater),
            ("1.0a", "1.0", Greater),
            ("1.05", "1.5", Equal),
            ("abc", "abd", Less),
            ("", "1", Less),
            ("", "", Equal),
            ("debian-6.1.0-28.conf", "debian-6.1.0-9.conf", Greater),
        ];
        for (a, b, expected) in cases {
            assert_eq!(version_cmp(a, b), expected, "{a} vs {b}");
            assert_eq!(version_cmp(b, a), expected.reverse(), "{b} vs {a}");
        }
    }

    /// The store, GC, Flatcar's next-kernel check and stage's driver choice used their own
    /// comparator (split on `.-_+~`, numbers as numbers, the longer list newer). This one
    /// orders every case that one was tested or documented on the same way.
    #[test]
    fn orders_the_former_store_comparator_cases_the_same() {
        use Ordering::*;
        let cases = [
            // store::compare_versions' doc examples
            ("570.9", "570.10", Less),
            ("580.159.04", "565.57.01", Greater),
            // store::driver_versions (select_newest_or_pinned) and stage's driver choice
            ("565.57.01", "570.9", Less),
            ("570.9", "570.10", Less),
            ("550.1", "570.1", Less),
            ("570.1", "580.1", Less),
            // store::gc_victims: kernels newest first
            ("6.1.0-9", "6.1.0-10", Less),
            ("6.1.0-10", "6.1.0-28", Less),
            ("6.1.0-28", "6.12.0-1", Less),
            ("6.12.0-1", "7.0", Less),
            // Flatcar's next kernel against the running one
            ("6.6.54-flatcar", "6.6.60-flatcar", Less),
            ("6.6.71-flatcar", "6.6.60-flatcar", Greater),
            ("6.6.100-flatcar", "6.6.95-flatcar", Greater),
            ("6.6.60-flatcar", "6.6.60-flatcar", Equal),
        ];
        for (a, b, expected) in cases {
            assert_eq!(version_cmp(a, b), expected, "{a} vs {b}");
            assert_eq!(version_cmp(b, a), expected.reverse(), "{b} vs {a}");
        }
    }

    /// Where the two differed, this one follows systemd (pre-releases before releases, `-`
    /// before `.`): no driver or kernel version the tests use is among these.
    #[test]
    fn differs_from_the_former_store_comparator_only_where_systemd_rules() {
        assert_eq!(version_cmp("1.0~rc1", "1.0"), Ordering::Less); // was Greater
        assert_eq!(version_cmp("123-9", "123.1-1"), Ordering::Less); // was Greater
    }
}
