//! Reachability matrices: the `expect` text of a probe, and tables of what
//! was observed.
//!
//! ```text
//! -    x/a x/b y/a
//! x/a  .   X   .
//! x/b  .   X   .
//! ```
//!
//! The first line is `-` followed by the destination pods, each following
//! line a source pod and one cell per destination: `.` connects, `X` does not.
use std::fmt::{self, Write as _};

use anyhow::{bail, Result};

/// One cell: the connection succeeds (`.`) or fails (`X`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    Pass,
    Fail,
}

impl Reach {
    pub fn from_bool(connected: bool) -> Self {
        if connected {
            Self::Pass
        } else {
            Self::Fail
        }
    }

    pub fn symbol(self) -> char {
        match self {
            Self::Pass => '.',
            Self::Fail => 'X',
        }
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char(self.symbol())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    /// Destination pods, `namespace/name`.
    pub cols: Vec<String>,
    /// Source pod and one cell per destination.
    pub rows: Vec<(String, Vec<Reach>)>,
}

impl Matrix {
    /// Parses the `expect` text. Blank lines are ignored; everything else
    /// must be a well-formed row.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            bail!("the matrix is empty");
        };
        let mut head = header.split_whitespace();
        if head.next() != Some("-") {
            bail!("the first line must start with `-` followed by the destination pods, found {header:?}");
        }
        let cols: Vec<String> = head.map(str::to_string).collect();
        if cols.is_empty() {
            bail!("the first line names no destination pod");
        }
        check_unique(&cols, "destination")?;
        let mut rows = Vec::new();
        for (i, line) in lines {
            let mut words = line.split_whitespace();
            let src = words.next().expect("non-blank line").to_string();
            let cells: Vec<Reach> = words
                .map(|w| match w {
                    "." => Ok(Reach::Pass),
                    "X" | "x" => Ok(Reach::Fail),
                    other => bail!("line {}: cell {other:?} is neither `.` nor `X`", i + 1),
                })
                .collect::<Result<_>>()?;
            if cells.len() != cols.len() {
                bail!(
                    "line {}: row {src} has {} cells for {} destinations",
                    i + 1,
                    cells.len(),
                    cols.len()
                );
            }
            rows.push((src, cells));
        }
        if rows.is_empty() {
            bail!("the matrix has no source rows");
        }
        check_unique(
            &rows.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            "source",
        )?;
        Ok(Self { cols, rows })
    }

    /// Every (source, destination, expected) cell, row by row.
    pub fn cells(&self) -> impl Iterator<Item = (&str, &str, Reach)> {
        self.rows.iter().flat_map(move |(src, cells)| {
            self.cols
                .iter()
                .zip(cells)
                .map(move |(dst, r)| (src.as_str(), dst.as_str(), *r))
        })
    }

    /// Every pod the matrix names.
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        self.cols
            .iter()
            .map(String::as_str)
            .chain(self.rows.iter().map(|(s, _)| s.as_str()))
    }
}

fn check_unique(names: &[String], what: &str) -> Result<()> {
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            bail!("{what} {n} appears twice");
        }
    }
    Ok(())
}

/// A text table with aligned columns: a header row, then rows of cells.
/// Cells are plain text; `paint` may wrap a cell in terminal colours
/// (it gets the plain text and returns what to print, same visible width).
pub fn table(
    corner: &str,
    header: &[String],
    rows: &[(String, Vec<String>)],
    paint: &dyn Fn(&str) -> String,
) -> String {
    let first = rows
        .iter()
        .map(|(r, _)| r.chars().count())
        .chain([corner.chars().count()])
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .filter_map(|(_, cells)| cells.get(i))
                .map(|c| c.chars().count())
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{corner:<first$}");
    for (h, w) in header.iter().zip(&widths) {
        let _ = write!(out, "  {h:<w$}");
    }
    out = out.trim_end().to_string();
    out.push('\n');
    for (name, cells) in rows {
        let mut line = format!("{name:<first$}");
        for (c, w) in cells.iter().zip(&widths) {
            let pad = w.saturating_sub(c.chars().count());
            let _ = write!(line, "  {}{}", paint(c), " ".repeat(pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A matrix in the `expect` format (for messages and the demo).
pub fn render(m: &Matrix) -> String {
    let rows: Vec<(String, Vec<String>)> = m
        .rows
        .iter()
        .map(|(s, cells)| (s.clone(), cells.iter().map(|c| c.to_string()).collect()))
        .collect();
    table("-", &m.cols, &rows, &|c| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "
          -    x/a x/b y/a
          x/a  .   X   .
          x/b  .   x   .

          y/a  .   X   .
    ";

    #[test]
    fn parses_rows_and_columns() {
        let m = Matrix::parse(TEXT).unwrap();
        assert_eq!(m.cols, ["x/a", "x/b", "y/a"]);
        assert_eq!(m.rows.len(), 3);
        assert_eq!(
            m.rows[1],
            (
                "x/b".to_string(),
                vec![Reach::Pass, Reach::Fail, Reach::Pass]
            )
        );
        let cells: Vec<_> = m.cells().collect();
        assert_eq!(cells.len(), 9);
        assert_eq!(cells[1], ("x/a", "x/b", Reach::Fail));
        assert_eq!(cells[8], ("y/a", "y/a", Reach::Pass));
        assert_eq!(m.pods().count(), 6);
    }

    #[test]
    fn single_column() {
        let m = Matrix::parse("-  x/backend\nx/frontend .\nx/monitoring X\n").unwrap();
        assert_eq!(m.cols, ["x/backend"]);
        assert_eq!(m.rows[1].1, [Reach::Fail]);
    }

    #[test]
    fn rejects_malformed_matrices() {
        let err = |t: &str| Matrix::parse(t).unwrap_err().to_string();
        assert!(err("").contains("empty"));
        assert!(err("x/a x/b\nx/a . .").contains("`-`"));
        assert!(err("-\nx/a .").contains("no destination"));
        assert!(err("- x/a x/b\nx/a .").contains("1 cells for 2"));
        assert!(err("- x/a\nx/a ok").contains("neither"));
        assert!(err("- x/a x/a\nx/a . .").contains("twice"));
        assert!(err("- x/a\nx/a .\nx/a X").contains("source x/a appears twice"));
        assert!(err("- x/a").contains("no source rows"));
    }

    #[test]
    fn renders_aligned_and_round_trips() {
        let m = Matrix::parse(TEXT).unwrap();
        let text = render(&m);
        assert_eq!(
            text,
            "-    x/a  x/b  y/a\nx/a  .    X    .\nx/b  .    X    .\ny/a  .    X    .\n"
        );
        assert_eq!(Matrix::parse(&text).unwrap(), m);
    }

    #[test]
    fn table_pads_painted_cells_by_visible_width() {
        let rows = vec![(
            "a/long-name".to_string(),
            vec!["ok".to_string(), "DROP".to_string()],
        )];
        let t = table("", &["x/1".into(), "y/2".into()], &rows, &|c| {
            format!("<{c}>")
        });
        // Padding follows the plain text ("ok" in a 3-wide column), not the paint.
        assert_eq!(t, "             x/1  y/2\na/long-name  <ok>   <DROP>\n");
    }
}
