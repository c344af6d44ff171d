//! A job graph as a terminal shows it: one line per level, each job with
//! the jobs it waits for.

use tidepool::project::RunGraph;

/// The lines that show `graph`: a heading, then one line per level.
pub fn levels_text(heading: &str, graph: &RunGraph) -> Vec<String> {
    let jobs = graph.len();
    let mut lines = vec![format!(
        "{heading}: {jobs} job{}",
        if jobs == 1 { "" } else { "s" }
    )];
    let mut levels: Vec<Vec<String>> = Vec::new();
    for (i, id) in graph.jobs().iter().enumerate() {
        let level = graph.level(i);
        if levels.len() <= level {
            levels.resize(level + 1, Vec::new());
        }
        let after: Vec<&str> = graph
            .needs(i)
            .iter()
            .map(|&n| graph.jobs()[n].0.as_str())
            .collect();
        levels[level].push(match after.is_empty() {
            true => id.0.clone(),
            false => format!("{} (after {})", id.0, after.join(", ")),
        });
    }
    for (n, jobs) in levels.iter().enumerate() {
        lines.push(format!("  level {}: {}", n + 1, jobs.join(", ")));
    }
    lines
}
