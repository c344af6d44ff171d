//! Job graphs: a job's `next` (one job or a list: they start after it
//! completes) and `needs` (it starts when all of them completed) make the
//! edges. Loading checks them (unknown jobs, self-references, cycles, each
//! with its file and line); [`RunGraph`] is what a chained run executes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use super::{Job, JobId, Problem, Project};

/// The most jobs a project may run at once by default (`max_parallel_jobs`).
pub const DEFAULT_MAX_PARALLEL_JOBS: usize = 4;
/// The most `max_parallel_jobs` may say.
pub const MAX_PARALLEL_JOBS: usize = 64;

/// The key that made an edge, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EdgeKey {
    /// `next` of the edge's first job.
    Next,
    /// `needs` of the edge's second job.
    Needs,
}

impl EdgeKey {
    fn as_str(self) -> &'static str {
        match self {
            EdgeKey::Next => "next",
            EdgeKey::Needs => "needs",
        }
    }
}

/// Where a job file says `next` and `needs` (1-based lines), for messages.
#[derive(Debug, Clone, Default)]
pub(crate) struct EdgeLines {
    /// The job file.
    pub file: PathBuf,
    /// The line of `next`.
    pub next: Option<usize>,
    /// The line of `needs`.
    pub needs: Option<usize>,
}

impl EdgeLines {
    fn problem(&self, key: EdgeKey, message: String) -> Problem {
        let line = match key {
            EdgeKey::Next => self.next,
            EdgeKey::Needs => self.needs,
        };
        Problem::new(&self.file, line, message)
    }
}

/// Reads a `next` or `needs` value: one job ID or a list of them, each once.
pub(crate) fn job_list(key: &str, v: &toml::Value) -> Result<Vec<String>, String> {
    let items: Vec<&toml::Value> = match v {
        toml::Value::String(_) => vec![v],
        toml::Value::Array(items) => items.iter().collect(),
        other => {
            return Err(format!(
                "{key} must be a job ID or a list of job IDs, not {}",
                other.type_str()
            ));
        }
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let toml::Value::String(id) = item else {
            return Err(format!(
                "{key} must list job IDs (strings), not {}",
                item.type_str()
            ));
        };
        if out.contains(id) {
            return Err(format!("{key} names {id:?} twice"));
        }
        out.push(id.clone());
    }
    Ok(out)
}

/// Checks every job's `next` and `needs`: each names a job of the project,
/// not the job itself, and the edges make no cycle (named: a → b → a).
pub(crate) fn check(
    jobs: &BTreeMap<JobId, Job>,
    lines: &BTreeMap<JobId, EdgeLines>,
    problems: &mut Vec<Problem>,
) {
    for (id, job) in jobs {
        let Some(at) = lines.get(id) else { continue };
        for (key, list) in [(EdgeKey::Next, &job.next), (EdgeKey::Needs, &job.needs)] {
            for other in list {
                if let Some(why) = bad_reference(jobs, id, key, other) {
                    problems.push(at.problem(key, why));
                }
            }
        }
    }
    // Cycles are looked for on known edges only: an unknown job is said once.
    for (cycle, key) in cycles(jobs) {
        let names: Vec<&str> = cycle.iter().map(|j| j.0.as_str()).collect();
        let message = format!(
            "the job graph has a cycle: {} (a job cannot wait for itself)",
            names.join(" → ")
        );
        // Said where the cycle's first edge is written.
        let declared_by = match key {
            EdgeKey::Next => &cycle[0],
            EdgeKey::Needs => &cycle[1],
        };
        if let Some(at) = lines.get(declared_by) {
            problems.push(at.problem(key, message));
        }
    }
}

/// Why `id`'s `key` may not name `other`, if it may not.
fn bad_reference(
    jobs: &BTreeMap<JobId, Job>,
    id: &JobId,
    key: EdgeKey,
    other: &JobId,
) -> Option<String> {
    let key_name = key.as_str();
    if other == id {
        return Some(match key {
            EdgeKey::Next => format!("next = {:?}: a job cannot run after itself", other.0),
            EdgeKey::Needs => format!("needs {:?}: a job cannot wait for itself", other.0),
        });
    }
    if jobs.contains_key(other) {
        return None;
    }
    let hint = jobs
        .keys()
        .find(|j| j.0.eq_ignore_ascii_case(&other.0))
        .map(|j| format!("; job IDs match exactly here: did you mean {:?}?", j.0))
        .unwrap_or_default();
    Some(format!(
        "{key_name} = {:?}: no such job in this project (jobs: {}){hint}",
        other.0,
        jobs.keys()
            .map(|j| j.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The jobs that start after each job: its `next`, and the jobs that need it;
/// with the key that made each edge. Unknown jobs are left out.
fn successors(jobs: &BTreeMap<JobId, Job>) -> BTreeMap<&JobId, Vec<(&JobId, EdgeKey)>> {
    let mut out: BTreeMap<&JobId, Vec<(&JobId, EdgeKey)>> =
        jobs.keys().map(|id| (id, Vec::new())).collect();
    for (id, job) in jobs {
        for n in job.next.iter().filter(|n| jobs.contains_key(*n)) {
            push_once(out.get_mut(id), n, EdgeKey::Next);
        }
        for need in &job.needs {
            if let Some((need, _)) = jobs.get_key_value(need) {
                push_once(out.get_mut(need), id, EdgeKey::Needs);
            }
        }
    }
    out
}

fn push_once<'a>(list: Option<&mut Vec<(&'a JobId, EdgeKey)>>, to: &'a JobId, key: EdgeKey) {
    if let Some(list) = list
        && !list.iter().any(|(j, _)| *j == to)
    {
        list.push((to, key));
    }
}

/// The cycles among the jobs' edges (self-references left out), each once,
/// starting at its smallest job and ending with it again; with the key of its
/// first edge. Iterative: a long chain cannot overflow the stack.
fn cycles(jobs: &BTreeMap<JobId, Job>) -> Vec<(Vec<JobId>, EdgeKey)> {
    let succ = successors(jobs);
    let mut state: BTreeMap<&JobId, u8> = BTreeMap::new(); // 1: on the path, 2: done
    let mut found: Vec<(Vec<JobId>, EdgeKey)> = Vec::new();
    let mut seen: BTreeSet<Vec<JobId>> = BTreeSet::new();
    for root in jobs.keys() {
        if state.contains_key(root) {
            continue;
        }
        // The path from the root, each job with the next successor to visit.
        let mut path: Vec<(&JobId, usize)> = vec![(root, 0)];
        state.insert(root, 1);
        while let Some((at, i)) = path.last_mut() {
            let at = *at;
            let Some(&(to, _)) = succ[at].get(*i) else {
                state.insert(at, 2);
                path.pop();
                continue;
            };
            *i += 1;
            match state.get(to) {
                None => {
                    state.insert(to, 1);
                    path.push((to, 0));
                }
                Some(1) if to != at => {
                    let from = path.iter().position(|(j, _)| *j == to).unwrap_or(0);
                    let ring: Vec<JobId> = path[from..].iter().map(|(j, _)| (*j).clone()).collect();
                    let cycle = rotated(ring);
                    if seen.insert(cycle.clone()) {
                        let key = edge_key(&succ, &cycle[0], &cycle[1]);
                        let mut closed = cycle;
                        closed.push(closed[0].clone());
                        found.push((closed, key));
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// The ring started at its smallest job.
fn rotated(mut ring: Vec<JobId>) -> Vec<JobId> {
    let smallest = (0..ring.len()).min_by_key(|&i| &ring[i]).unwrap_or(0);
    ring.rotate_left(smallest);
    ring
}

fn edge_key(succ: &BTreeMap<&JobId, Vec<(&JobId, EdgeKey)>>, from: &JobId, to: &JobId) -> EdgeKey {
    succ.get(from)
        .and_then(|l| l.iter().find(|(j, _)| *j == to))
        .map(|(_, k)| *k)
        .unwrap_or(EdgeKey::Next)
}

/// The jobs a run executes and in what order they may start: with chained
/// jobs, the start job and every job that depends on it, directly or not
/// (through `next` or `needs`); a job waits for the jobs it depends on that
/// are part of the run (the others count as done).
#[derive(Debug, Clone)]
pub struct RunGraph {
    /// The jobs, in the order they start when ready at once: by level, then
    /// as found from the start job (`next` in its order, then who needs it).
    jobs: Vec<JobId>,
    /// For each job (by index), the jobs of the run it waits for.
    needs: Vec<Vec<usize>>,
    /// For each job, the jobs of the run that wait for it.
    dependents: Vec<Vec<usize>>,
    /// For each job, its level: 0 for the start, else one past the
    /// highest level among the jobs it waits for.
    levels: Vec<usize>,
}

impl RunGraph {
    /// The graph a run of job `start` executes: with `chained`, `start` and
    /// its descendants; else `start` alone. `None`: no such job (matched as
    /// [`Project::job`] does).
    pub fn of(project: &Project, start: &str, chained: bool) -> Option<RunGraph> {
        let start = project.job(start)?.id.clone();
        if !chained {
            return Some(RunGraph::from_members(&project.jobs, vec![start]));
        }
        let succ = successors(&project.jobs);
        let mut members = vec![start.clone()];
        let mut queue = VecDeque::from([start]);
        while let Some(at) = queue.pop_front() {
            for (to, _) in succ.get(&at).into_iter().flatten() {
                if !members.contains(to) {
                    members.push((*to).clone());
                    queue.push_back((*to).clone());
                }
            }
        }
        Some(RunGraph::from_members(&project.jobs, members))
    }

    /// The whole project's graph: every job, those that wait for none at level 0.
    pub fn whole(project: &Project) -> RunGraph {
        RunGraph::from_members(&project.jobs, project.jobs.keys().cloned().collect())
    }

    /// The graph over `members` (in the order found), their edges among them.
    fn from_members(jobs: &BTreeMap<JobId, Job>, members: Vec<JobId>) -> RunGraph {
        let succ = successors(jobs);
        let index: BTreeMap<&JobId, usize> =
            members.iter().enumerate().map(|(i, j)| (j, i)).collect();
        let mut dependents = vec![Vec::new(); members.len()];
        let mut needs = vec![Vec::new(); members.len()];
        for (i, id) in members.iter().enumerate() {
            for (to, _) in succ.get(id).into_iter().flatten() {
                if let Some(&k) = index.get(to) {
                    dependents[i].push(k);
                    needs[k].push(i);
                }
            }
        }
        let levels = longest_paths(&needs, &dependents);
        // Jobs on a cycle (a project that loaded has none) never become ready: left out.
        let mut order: Vec<usize> = (0..members.len())
            .filter(|&i| levels[i] != usize::MAX)
            .collect();
        order.sort_by_key(|&i| (levels[i], i));
        let mut at = vec![usize::MAX; members.len()];
        for (new, &old) in order.iter().enumerate() {
            at[old] = new;
        }
        let remap = |list: &Vec<usize>| -> Vec<usize> {
            let mut l: Vec<usize> = list
                .iter()
                .map(|&k| at[k])
                .filter(|&k| k != usize::MAX)
                .collect();
            l.sort_unstable();
            l
        };
        RunGraph {
            jobs: order.iter().map(|&i| members[i].clone()).collect(),
            needs: order.iter().map(|&i| remap(&needs[i])).collect(),
            dependents: order.iter().map(|&i| remap(&dependents[i])).collect(),
            levels: order.iter().map(|&i| levels[i]).collect(),
        }
    }

    /// The jobs, in start order when ready at once (the start job first).
    pub fn jobs(&self) -> &[JobId] {
        &self.jobs
    }

    /// How many jobs the run executes.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether it has no job.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The index of a job of the run.
    pub fn index(&self, id: &JobId) -> Option<usize> {
        self.jobs.iter().position(|j| j == id)
    }

    /// The jobs (by index) job `i` waits for.
    pub fn needs(&self, i: usize) -> &[usize] {
        &self.needs[i]
    }

    /// The jobs (by index) that wait for job `i`.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }

    /// Job `i`'s level (0: waits for no job of the run).
    pub fn level(&self, i: usize) -> usize {
        self.levels[i]
    }

    /// The jobs by level, each level in start order.
    pub fn levels(&self) -> Vec<Vec<JobId>> {
        let mut out: Vec<Vec<JobId>> = Vec::new();
        for (i, id) in self.jobs.iter().enumerate() {
            let l = self.levels[i];
            if out.len() <= l {
                out.resize(l + 1, Vec::new());
            }
            out[l].push(id.clone());
        }
        out
    }

    /// Every job (by index) that depends on job `i`, directly or not, in index order.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.jobs.len()];
        let mut stack = vec![i];
        while let Some(at) = stack.pop() {
            for &d in &self.dependents[at] {
                if !seen[d] {
                    seen[d] = true;
                    stack.push(d);
                }
            }
        }
        (0..self.jobs.len()).filter(|&k| seen[k]).collect()
    }
}

/// Each node's level: the longest path to it from a node that needs none
/// (Kahn's order); `usize::MAX` for nodes on or after a cycle.
fn longest_paths(needs: &[Vec<usize>], dependents: &[Vec<usize>]) -> Vec<usize> {
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut levels = vec![usize::MAX; needs.len()];
    let mut ready: VecDeque<usize> = (0..needs.len()).filter(|&i| waiting[i] == 0).collect();
    for &i in &ready {
        levels[i] = 0;
    }
    while let Some(i) = ready.pop_front() {
        for &d in &dependents[i] {
            let l = levels[i] + 1;
            levels[d] = if levels[d] == usize::MAX {
                l
            } else {
                levels[d].max(l)
            };
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    // A node reached from a cycle got a level but never became ready.
    for (i, w) in waiting.iter().enumerate() {
        if *w > 0 {
            levels[i] = usize::MAX;
        }
    }
    levels
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::{LoadOptions, load_project_text};
    use super::*;

    /// Loads a project whose jobs (ID, then the keys its file starts with)
    /// each copy a CSV into SQLite.
    fn project(jobs: &[(&str, &str)]) -> Result<Project, Vec<Problem>> {
        let files = jobs
            .iter()
            .map(|(id, keys)| {
                let text = format!(
                    "{keys}\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n\
                     [[stages]]\ntable = \"t\"\naction = \"insert\"\n\
                     fields = [{{ column = \"id\", origin = \"id\" }}]\n"
                );
                (PathBuf::from(format!("/p/jobs/{id}.toml")), text)
            })
            .collect();
        load_project_text(
            Path::new("/p"),
            "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n\
             [connections.db]\nkind = \"sqlite\"\npath = \"/d/db.sqlite\"\n",
            files,
            &LoadOptions {
                data_dir: PathBuf::from("/d"),
            },
        )
    }

    fn problems(jobs: &[(&str, &str)]) -> Vec<String> {
        match project(jobs) {
            Ok(_) => panic!("{jobs:?} loaded"),
            Err(p) => p.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn ids(list: &[JobId]) -> Vec<&str> {
        list.iter().map(|j| j.0.as_str()).collect()
    }

    fn diamond() -> Project {
        project(&[
            ("a", "next = [\"b\", \"c\"]"),
            ("b", ""),
            ("c", ""),
            ("d", "# waits for both\nneeds = [\"b\", \"c\"]"),
        ])
        .unwrap_or_else(|e| panic!("{e:#?}"))
    }

    #[test]
    fn next_takes_one_job_or_a_list_and_needs_a_list() {
        let p = diamond();
        assert_eq!(ids(&p.jobs[&JobId("a".into())].next), ["b", "c"]);
        assert_eq!(ids(&p.jobs[&JobId("d".into())].needs), ["b", "c"]);
        let p = project(&[("a", "next = \"b\""), ("b", "needs = \"a\"")]).unwrap();
        assert_eq!(ids(&p.jobs[&JobId("a".into())].next), ["b"]);
        assert_eq!(ids(&p.jobs[&JobId("b".into())].needs), ["a"]);
        assert_eq!(p.max_parallel_jobs, DEFAULT_MAX_PARALLEL_JOBS);
    }

    #[test]
    fn unknown_and_self_references_say_file_line_and_job() {
        assert_eq!(
            problems(&[("a", "next = [\"b\", \"zzz\"]"), ("b", "")]),
            ["/p/jobs/a.toml:1: next = \"zzz\": no such job in this project (jobs: a, b)"]
        );
        assert_eq!(
            problems(&[("a", ""), ("b", "# b\nneeds = \"A\"")]),
            [
                "/p/jobs/b.toml:2: needs = \"A\": no such job in this project (jobs: a, b); \
                 job IDs match exactly here: did you mean \"a\"?"
            ]
        );
        assert_eq!(
            problems(&[("a", "next = \"a\"")]),
            ["/p/jobs/a.toml:1: next = \"a\": a job cannot run after itself"]
        );
        assert_eq!(
            problems(&[("a", "needs = [\"a\"]")]),
            ["/p/jobs/a.toml:1: needs \"a\": a job cannot wait for itself"]
        );
    }

    #[test]
    fn malformed_lists_are_refused() {
        let said = problems(&[("a", "next = 3")]);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("/p/jobs/a.toml:1: next must be a job ID or a list of job IDs"),
            "{said:?}"
        );
        assert_eq!(
            problems(&[("a", "needs = [\"b\", 1]"), ("b", "")]),
            ["/p/jobs/a.toml:1: needs must list job IDs (strings), not integer"]
        );
        assert_eq!(
            problems(&[("a", "next = [\"b\", \"b\"]"), ("b", "")]),
            ["/p/jobs/a.toml:1: next names \"b\" twice"]
        );
    }

    #[test]
    fn cycles_are_named_where_their_first_edge_is_written() {
        // Through next only.
        assert_eq!(
            problems(&[("a", "next = \"b\""), ("b", "next = \"a\"")]),
            [
                "/p/jobs/a.toml:1: the job graph has a cycle: a → b → a (a job cannot wait for itself)"
            ]
        );
        // Through next and needs: a → b is written in b's file as needs.
        assert_eq!(
            problems(&[
                ("a", ""),
                ("b", "next = \"c\"\nneeds = \"a\""),
                ("c", "next = [\"a\"]\n"),
                ("x", "next = \"b\""),
            ]),
            [
                "/p/jobs/b.toml:2: the job graph has a cycle: a → b → c → a (a job cannot wait for itself)"
            ]
        );
        // Two separate cycles, each said once; a diamond is not one.
        let two = problems(&[
            ("a", "next = \"b\""),
            ("b", "next = [\"a\", \"c\"]"),
            ("c", "next = \"d\""),
            ("d", "next = \"c\""),
        ]);
        assert_eq!(two.len(), 2, "{two:?}");
        assert!(two[0].contains("a → b → a"), "{two:?}");
        assert!(two[1].contains("c → d → c"), "{two:?}");
        let _ = diamond();
    }

    #[test]
    fn a_run_executes_the_start_job_and_what_depends_on_it_in_level_order() {
        let p = diamond();
        let g = RunGraph::of(&p, "a", true).unwrap();
        assert_eq!(ids(g.jobs()), ["a", "b", "c", "d"]);
        assert_eq!(g.levels().len(), 3);
        assert_eq!(ids(&g.levels()[1]), ["b", "c"]);
        let d = g.index(&JobId("d".into())).unwrap();
        assert_eq!(g.needs(d), [1, 2]);
        assert_eq!(g.dependents(0), [1, 2]);
        assert_eq!(g.descendants(1), [3]);
        // From b: b and d; d's need of c (not in the run) counts as done.
        let g = RunGraph::of(&p, "B", true).unwrap();
        assert_eq!(ids(g.jobs()), ["b", "d"]);
        assert_eq!(g.needs(1), [0]);
        // Unchained: the job alone.
        assert_eq!(ids(RunGraph::of(&p, "a", false).unwrap().jobs()), ["a"]);
        assert!(RunGraph::of(&p, "zzz", true).is_none());
        // A longer branch puts the join after it: a → b → e → d and a → c → d.
        let p = project(&[
            ("a", "next = [\"b\", \"c\"]"),
            ("b", "next = \"e\""),
            ("c", "next = \"d\""),
            ("d", ""),
            ("e", "next = \"d\""),
        ])
        .unwrap();
        let g = RunGraph::of(&p, "a", true).unwrap();
        assert_eq!(ids(g.jobs()), ["a", "b", "c", "e", "d"]);
        assert_eq!(g.level(4), 3);
        let whole = RunGraph::whole(&p);
        assert_eq!(whole.levels().len(), 4);
    }

    #[test]
    fn max_parallel_jobs_is_bounded() {
        let load = |line: &str| {
            load_project_text(
                Path::new("/p"),
                &format!("{line}\n[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n"),
                Vec::new(),
                &LoadOptions {
                    data_dir: PathBuf::from("/d"),
                },
            )
        };
        assert_eq!(load("max_parallel_jobs = 2").unwrap().max_parallel_jobs, 2);
        for bad in ["0", "65", "1.5", "\"2\""] {
            let e = load(&format!("max_parallel_jobs = {bad}")).unwrap_err();
            assert_eq!(
                e[0].to_string(),
                "/p/project.toml:1: max_parallel_jobs must be a whole number from 1 to 64",
                "{bad}"
            );
        }
    }
}
