//! The fold's co-occurring pairs into the neighbour lists: buffered
//! pairs sorted by item and merged, each touched list once, then pruned;
//! on the folding thread or on a thread of its own (docs/RECOMMENDATIONS.md,
//! "How a rebuild runs").

use super::strongest;

/// One direction of a co-occurring pair, waiting in the fold's pair buffer
/// to be added to `key`'s neighbour list.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pair {
    key: u32,
    nb: u32,
    w: f32,
}

impl Pair {
    pub(super) fn new(key: u32, nb: u32, w: f32) -> Pair {
        Pair { key, nb, w }
    }
}

/// The neighbour lists, and the scratch of merging buffered pairs into
/// them.
struct Lists {
    max_neighbours: usize,
    /// Neighbours per item, weighted (f32: half the memory traffic; sums
    /// of one pair stay well within its precision for ranking), in no
    /// particular order.
    co: Vec<Vec<(u32, f32)>>,
    /// Scratch of the merge: pairs sorted by item, where each item's run
    /// starts, and a dense accumulator over items.
    sorted: Vec<Pair>,
    run_start: Vec<u32>,
    acc: Vec<f32>,
    seen: Vec<bool>,
    merged: Vec<u32>,
}

impl Lists {
    fn new(max_neighbours: usize) -> Lists {
        Lists {
            max_neighbours,
            co: Vec::new(),
            sorted: Vec::new(),
            run_start: Vec::new(),
            acc: Vec::new(),
            seen: Vec::new(),
            merged: Vec::new(),
        }
    }

    /// Adds `pairs` (of the first `items` items) to the neighbour lists,
    /// and empties it: sorted by item (stable: each list sums in log
    /// order), each touched list merged once through a dense accumulator,
    /// then pruned.
    fn merge(&mut self, pairs: &mut Vec<Pair>, items: usize) {
        if self.co.len() < items {
            self.co.resize_with(items, Vec::new);
        }
        let n = self.co.len();
        let max_n = self.max_neighbours;
        self.run_start.clear();
        self.run_start.resize(n + 1, 0);
        for p in pairs.iter() {
            self.run_start[p.key as usize + 1] += 1;
        }
        for i in 0..n {
            self.run_start[i + 1] += self.run_start[i];
        }
        self.sorted.clear();
        self.sorted.resize(pairs.len(), Pair::default());
        // run_start[i] is the next free place of item i's run while
        // scattering; afterwards it is where run i + 1 starts.
        for p in pairs.iter() {
            let at = &mut self.run_start[p.key as usize];
            self.sorted[*at as usize] = *p;
            *at += 1;
        }
        pairs.clear();
        self.acc.resize(n, 0.0);
        self.seen.resize(n, false);
        let mut from = 0usize;
        for key in 0..n {
            let to = self.run_start[key] as usize;
            if to == from {
                continue;
            }
            let list = &mut self.co[key];
            self.merged.clear();
            for &(nb, w) in list.iter() {
                self.acc[nb as usize] = w;
                self.seen[nb as usize] = true;
                self.merged.push(nb);
            }
            for p in &self.sorted[from..to] {
                let nb = p.nb as usize;
                if !self.seen[nb] {
                    self.seen[nb] = true;
                    self.acc[nb] = 0.0;
                    self.merged.push(p.nb);
                }
                self.acc[nb] += p.w;
            }
            list.clear();
            for &nb in &self.merged {
                list.push((nb, self.acc[nb as usize]));
                self.seen[nb as usize] = false;
            }
            if list.len() > 2 * max_n {
                strongest(list, max_n);
            }
            from = to;
        }
    }
}

/// The neighbour lists, merged into where the fold chose.
pub(super) struct Merging(Where);

/// Where buffered pairs are merged into the neighbour lists.
enum Where {
    /// On the folding thread, between events.
    Here(Lists),
    /// On a thread of its own, while the next pairs are buffered.
    Apart(MergeThread),
}

impl Merging {
    pub(super) fn here(max_neighbours: usize) -> Merging {
        Merging(Where::Here(Lists::new(max_neighbours)))
    }

    /// Merging on a thread of its own, named `rebuild-merge`.
    pub(super) fn apart(max_neighbours: usize) -> std::io::Result<Merging> {
        let (full, to_merge) = std::sync::mpsc::sync_channel::<(Vec<Pair>, usize)>(1);
        let (emptied, empty) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rebuild-merge".into())
            .spawn(move || {
                let mut lists = Lists::new(max_neighbours);
                for (mut pairs, items) in to_merge {
                    lists.merge(&mut pairs, items);
                    // Fails only when the builder is gone.
                    let _ = emptied.send(pairs);
                }
                lists
            })?;
        Ok(Merging(Where::Apart(MergeThread {
            full,
            empty,
            spare: Some(Vec::new()),
            thread,
        })))
    }

    /// Adds `pairs` (of the first `items` items) to the neighbour lists,
    /// here, or by handing them to the merge thread; `pairs` is left
    /// empty either way.
    pub(super) fn merge(&mut self, pairs: &mut Vec<Pair>, items: usize) {
        match &mut self.0 {
            Where::Here(lists) => lists.merge(pairs, items),
            Where::Apart(t) => {
                // The other buffer: unused yet, or back from the merge
                // thread once it merged it (a new one if that thread is
                // gone: its panic is passed on by `finish`).
                let next = match t.spare.take() {
                    Some(v) => v,
                    None => t.empty.recv().unwrap_or_default(),
                };
                let full = std::mem::replace(pairs, next);
                let _ = t.full.send((full, items));
            }
        }
    }

    /// Merges the last `pairs` and ends the merge thread, if any: the
    /// final neighbour lists, one per item.
    pub(super) fn finish(self, mut pairs: Vec<Pair>, items: usize) -> Vec<Vec<(u32, f32)>> {
        match self.0 {
            Where::Here(mut lists) => {
                lists.merge(&mut pairs, items);
                lists.co
            }
            Where::Apart(t) => {
                // The last merge also sizes the lists to every item.
                let _ = t.full.send((pairs, items));
                drop(t.full);
                t.thread
                    .join()
                    // A panic in the merge thread is a bug: pass it on.
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
                    .co
            }
        }
    }

    /// The neighbour lists merged so far (tests: merging here).
    #[cfg(test)]
    pub(super) fn co(&self) -> &[Vec<(u32, f32)>] {
        match &self.0 {
            Where::Here(lists) => &lists.co,
            Where::Apart(_) => panic!("the lists are on the merge thread"),
        }
    }
}

/// A merge thread: full pair buffers (with the item count when each was
/// sent) go to it in log order, emptied ones come back. Two buffers in
/// all: the one being filled and the one being merged.
struct MergeThread {
    full: std::sync::mpsc::SyncSender<(Vec<Pair>, usize)>,
    empty: std::sync::mpsc::Receiver<Vec<Pair>>,
    /// The second buffer, until it is first needed.
    spare: Option<Vec<Pair>>,
    thread: std::thread::JoinHandle<Lists>,
}
