//! Which near-tier keys move to the far tier when the near tier overflows: the least recently
//! generated ones, by logical position, across every (layer, slot) of the store.
//!
//! Pure planning over the per-sequence counters, so an eviction can first work out exactly how
//! many keys it will spill (and refuse with nothing changed if the far tier cannot take them),
//! then apply the plan.

/// One step of a plan: the `count` oldest near keys of sequence `seq` (index `layer · batch +
/// slot`) move to the far tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Move {
    pub seq: usize,
    pub count: usize,
}

/// Plans moving at least `want` tokens' worth of near keys (one token = one slot's key rows of
/// one position) to the far tier. `host[i]` and `far_keys[i]` are sequence `i`'s counters;
/// `far_keys` is advanced as planned. Returns the moves and how many tokens they move in all.
///
/// Order: the smallest position `far_keys[i]` (the oldest near key) first; among layers at the
/// same position the first layer, one token at a time (so layers take turns); within a layer
/// every slot whose oldest near key is at that position moves together, so the sequences of a
/// lockstep batch keep one length. A plan may move up to (slots − 1) tokens more than `want`.
pub(super) fn plan(
    host: &[usize],
    far_keys: &mut [usize],
    batch: usize,
    want: usize,
) -> (Vec<Move>, usize) {
    let mut moves = Vec::new();
    let mut moved = 0;
    while moved < want {
        // The oldest near key: (position, layer), first layer on ties.
        let best = (0..host.len())
            .filter(|&i| host[i] > far_keys[i])
            .map(|i| (far_keys[i], i / batch))
            .min();
        let Some((pos, layer)) = best else { break }; // no near keys left: nothing more to move
        let in_group = |i: usize| i / batch == layer && far_keys[i] == pos && host[i] > far_keys[i];
        let group: Vec<usize> = (layer * batch..(layer + 1) * batch)
            .filter(|&i| in_group(i))
            .collect();
        // Move the group no further than the next oldest near key elsewhere (at least one).
        let runner_up = (0..host.len())
            .filter(|&i| host[i] > far_keys[i] && !in_group(i))
            .map(|i| far_keys[i])
            .min()
            .unwrap_or(usize::MAX);
        let shortest = group
            .iter()
            .map(|&i| host[i] - far_keys[i])
            .min()
            .unwrap_or(0);
        let count = (want - moved)
            .div_ceil(group.len())
            .min(shortest)
            .min(runner_up.saturating_sub(pos).max(1));
        for &seq in &group {
            far_keys[seq] += count;
            moves.push(Move { seq, count });
        }
        moved += count * group.len();
    }
    (moves, moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockstep_layers_take_turns_and_slots_move_together() {
        // 2 layers × 2 slots, 3 near keys each, none far.
        let host = [3, 3, 3, 3];
        let mut far = [0; 4];
        let (moves, moved) = plan(&host, &mut far, 2, 4);
        assert_eq!(moved, 4);
        assert_eq!(
            far,
            [1, 1, 1, 1],
            "both layers lose their oldest position, both slots alike"
        );
        assert_eq!(moves.len(), 4);
    }

    #[test]
    fn ragged_slots_spill_oldest_position_first() {
        // One layer, slot 0 already has 2 far keys, slot 1 none.
        let host = [5, 4];
        let mut far = [2, 0];
        let (_, moved) = plan(&host, &mut far, 2, 3);
        assert_eq!(moved, 4, "a group may overshoot by less than its size");
        assert_eq!(
            far,
            [3, 3],
            "slot 1 catches up to position 2, then both move together"
        );
        let (_, moved) = plan(&host, &mut [5, 4], 2, 1);
        assert_eq!(moved, 0, "no near keys: nothing to plan");
    }
}
