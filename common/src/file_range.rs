//! Walking a byte range of a file in pieces of bounded length, for the loops that write, read
//! or copy a range through a fixed buffer.

/// The pieces of the bytes `from..to`, in order, each at most `max` long (at least 1), as
/// `(offset, len)`. Empty when `to <= from`.
pub fn pieces(from: u64, to: u64, max: usize) -> impl Iterator<Item = (u64, usize)> {
    let max = max.max(1);
    let mut at = from;
    std::iter::from_fn(move || {
        if at >= to {
            return None;
        }
        let len = usize::try_from(to - at).unwrap_or(usize::MAX).min(max);
        let piece = (at, len);
        at += len as u64;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_once_in_order() {
        assert_eq!(pieces(5, 5, 4).count(), 0);
        assert_eq!(pieces(9, 5, 4).count(), 0);
        assert_eq!(pieces(0, 8, 4).collect::<Vec<_>>(), [(0, 4), (4, 4)]);
        assert_eq!(
            pieces(3, 12, 4).collect::<Vec<_>>(),
            [(3, 4), (7, 4), (11, 1)]
        );
        assert_eq!(pieces(0, 2, 0).collect::<Vec<_>>(), [(0, 1), (1, 1)]);
    }
}
