//! `Range: bytes=...` for blobs (RFC 9110 §14.1.2), single ranges only.

/// What to send for a `Range` header.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// No usable range: send everything with 200 (the RFC allows ignoring
    /// a range, and multi-range requests are not served).
    Full,
    /// Bytes `first..=last`, with 206.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

pub fn parse(header: &str, total: u64) -> RangeSpec {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last `b` bytes.
        return match b.parse::<u64>() {
            Ok(0) => RangeSpec::Unsatisfiable,
            Ok(_) if total == 0 => RangeSpec::Unsatisfiable,
            Ok(n) => RangeSpec::Part(total - n.min(total), total - 1),
            Err(_) => RangeSpec::Full,
        };
    }
    let Ok(first) = a.parse::<u64>() else {
        return RangeSpec::Full;
    };
    let last = if b.is_empty() {
        None
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => Some(l),
            _ => return RangeSpec::Full,
        }
    };
    if first >= total {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Part(first, last.map_or(total - 1, |l| l.min(total - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::*;

    #[test]
    fn ranges() {
        assert_eq!(parse("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse("bytes=90-500", 100), Part(90, 99));
        assert_eq!(parse("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse("bytes=-500", 100), Part(0, 99));
        assert_eq!(parse("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse("bytes=5-1", 100), Full);
        assert_eq!(parse("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse("items=0-1", 100), Full);
        assert_eq!(parse("bytes=x-", 100), Full);
    }
}
