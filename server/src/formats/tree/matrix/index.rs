//! Position arithmetic of a selection, kept apart from I/O so that it is tested on its own: where
//! each stored column goes in the output, reads in ascending order for requests in any order, and
//! runs of neighbouring positions that one read serves.

/// Where the selected stored columns go in the output. A column named twice in `var_names` fills
/// two output positions; reads fetch each stored column once, ascending.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ColumnMap {
    /// `(stored column, output position)`, sorted.
    targets: Vec<(u64, u32)>,
    /// The distinct stored columns, ascending.
    stored: Vec<u64>,
}

impl ColumnMap {
    /// The map of `cols`, output positions in order. `None` if there are more than `u32::MAX`.
    pub(super) fn new(cols: &[u64]) -> Option<Self> {
        let mut targets = cols
            .iter()
            .enumerate()
            .map(|(new, &old)| u32::try_from(new).ok().map(|new| (old, new)))
            .collect::<Option<Vec<_>>>()?;
        targets.sort_unstable();
        let stored = dedup_sorted(targets.iter().map(|t| t.0));
        Some(Self { targets, stored })
    }

    /// The output positions stored column `col` fills, with `col`; empty if it is not selected.
    pub(super) fn targets_of(&self, col: u64) -> &[(u64, u32)] {
        let a = self.targets.partition_point(|t| t.0 < col);
        let b = a + self.targets[a..].partition_point(|t| t.0 == col);
        &self.targets[a..b]
    }

    /// The stored columns to read, each once, ascending.
    pub(super) fn stored(&self) -> &[u64] {
        &self.stored
    }
}

/// Requested positions as reads want them: ascending and unique, with where each requested
/// position is among them. `None` when the request already ascends without repeats.
pub(super) fn ascending(positions: &[u64]) -> Option<(Vec<u64>, Vec<usize>)> {
    if positions.windows(2).all(|w| w[0] < w[1]) {
        return None;
    }
    let rows = dedup_sorted(positions.iter().copied());
    let place = positions
        .iter()
        .map(|p| rows.binary_search(p).unwrap_or_else(|i| i))
        .collect();
    Some((rows, place))
}

/// The distinct values, ascending.
fn dedup_sorted(values: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut values: Vec<u64> = values.collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// Groups ascending positions into runs of neighbours (`near(previous, next)`).
pub(super) fn coalesce(rows: &[u64], near: impl Fn(u64, u64) -> bool) -> Vec<&[u64]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=rows.len() {
        if i == rows.len() || !near(rows[i - 1], rows[i]) {
            if i > start {
                runs.push(&rows[start..i]);
            }
            start = i;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_column_fills_every_position_it_is_named_at() {
        let map = ColumnMap::new(&[7, 2, 7, 0]).expect("small");
        assert_eq!(map.stored(), &[0, 2, 7]);
        assert_eq!(map.targets_of(7), &[(7, 0), (7, 2)]);
        assert_eq!(map.targets_of(2), &[(2, 1)]);
        assert_eq!(map.targets_of(0), &[(0, 3)]);
        assert!(map.targets_of(1).is_empty());
        assert!(map.targets_of(8).is_empty());
    }

    #[test]
    fn an_empty_selection_reads_nothing() {
        let map = ColumnMap::new(&[]).expect("small");
        assert!(map.stored().is_empty());
        assert!(map.targets_of(0).is_empty());
        assert_eq!(coalesce(&[], |_, _| true), Vec::<&[u64]>::new());
    }

    #[test]
    fn rows_in_any_order_are_read_ascending_and_put_back() {
        assert_eq!(ascending(&[1, 4, 9]), None);
        let (rows, place) = ascending(&[9, 1, 9, 4]).expect("unordered");
        assert_eq!(rows, vec![1, 4, 9]);
        assert_eq!(place, vec![2, 0, 2, 1]);
        // Reading `rows` and taking `place` gives the request back.
        let back: Vec<u64> = place.iter().map(|&i| rows[i]).collect();
        assert_eq!(back, vec![9, 1, 9, 4]);
        // A repeat alone is not ascending either.
        assert_eq!(ascending(&[3, 3]), Some((vec![3], vec![0, 0])));
    }

    #[test]
    fn runs_split_where_neighbours_are_too_far_apart() {
        let same_chunk = |a: u64, b: u64| a / 10 == b / 10;
        let rows = [0, 3, 9, 10, 25, 29];
        let runs = coalesce(&rows, same_chunk);
        assert_eq!(runs, vec![&[0, 3, 9][..], &[10], &[25, 29]]);
        assert_eq!(runs.concat(), rows);
        let gap = |a: u64, b: u64| b - a <= 2;
        assert_eq!(coalesce(&[1, 2, 4, 7], gap), vec![&[1, 2, 4][..], &[7]]);
    }
}
