//! Graph algorithms over a workflow's dependencies: cycles, reachability
//! and everything downstream of a step. Iterative, so a chain of thousands
//! of steps cannot overflow the stack.

use std::collections::HashSet;

use super::Step;

/// A cycle in the dependency graph, if there is one, as the steps on it
/// (the first repeated at the end).
pub(crate) fn find_cycle(steps: &[Step]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; steps.len()];
    for start in 0..steps.len() {
        if mark[start] != Mark::New {
            continue;
        }
        // (step, next dependency to visit)
        let mut stack = vec![(start, 0usize)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = steps[node].depends_on.get(*next) {
                *next += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::Open;
                        stack.push((dep, 0));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        // Each step on the stack depends on the next.
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|&(n, _)| n).collect();
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

/// Whether `ancestor` is reachable from `step` through dependencies.
pub(crate) fn depends_on(steps: &[Step], step: usize, ancestor: usize) -> bool {
    let mut seen = HashSet::new();
    let mut todo = vec![step];
    while let Some(node) = todo.pop() {
        for &dep in &steps[node].depends_on {
            if dep == ancestor {
                return true;
            }
            if seen.insert(dep) {
                todo.push(dep);
            }
        }
    }
    false
}

/// `start` and every step that depends on it, directly or not, in file
/// order.
pub(crate) fn downstream(steps: &[Step], start: usize) -> Vec<usize> {
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        for &dep in &step.depends_on {
            dependents[dep].push(i);
        }
    }
    let mut seen = vec![false; steps.len()];
    seen[start] = true;
    let mut todo = vec![start];
    while let Some(step) = todo.pop() {
        for &dependent in &dependents[step] {
            if !std::mem::replace(&mut seen[dependent], true) {
                todo.push(dependent);
            }
        }
    }
    (0..steps.len()).filter(|&i| seen[i]).collect()
}
