//! PNG charts with plotters' bitmap backend. Text needs a font: plotters'
//! `ab_glyph` feature renders a TrueType file that we read at run time
//! (Debian's fonts-dejavu-core, which `cargo xtask setup` installs); no
//! system font lookup is involved. Without the font no PNG is written and
//! the report says so (every number is in its tables anyway).
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::{coord::Shift, prelude::*};

use crate::report::{Results, UPDATE_P99_MS};
use crate::stats::{median, percentile};

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const FONT: &str = "sans-serif";

/// Register the font; false when none of the known files exists.
pub fn init_font() -> bool {
    for p in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(p) {
            let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT, FontStyle::Normal, leaked).is_ok() {
                return true;
            }
        }
    }
    false
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Grouped bars: one group per category, one bar per series.
pub struct Bars {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<(String, Vec<f64>)>,
    /// A horizontal reference line (value, label).
    pub hline: Option<(f64, String)>,
}

pub fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, b: &Bars) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let n = b.categories.len().max(1);
    let ymax = b
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(b.hline.iter().map(|h| h.0))
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.18;
    let mut chart = ChartBuilder::on(area)
        .caption(&b.title, (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
        .map_err(err)?;
    let cats = b.categories.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
                cats[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(b.y_label.as_str())
        .label_style((FONT, 13))
        .draw()
        .map_err(err)?;
    let m = b.series.len().max(1);
    let w = 0.8 / m as f64;
    for (k, (name, vals)) in b.series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        chart
            .draw_series(
                vals.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, v)| {
                        let x0 = i as f64 - 0.4 + k as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w * 0.92, *v)], color.filled())
                    }),
            )
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    if let Some((y, label)) = &b.hline {
        chart
            .draw_series(LineSeries::new(
                vec![(-0.5, *y), (n as f64 - 0.5, *y)],
                BLACK.stroke_width(2),
            ))
            .map_err(err)?
            .label(label.as_str())
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Lines over a (log) x axis.
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

pub fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, l: &Lines) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let pts = || {
        l.series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|p| p.0.is_finite() && p.0 > 0.0 && p.1.is_finite())
    };
    if pts().next().is_none() {
        area.titled(&l.title, (FONT, 18)).map_err(err)?;
        return Ok(());
    }
    let xmin = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let xmax = pts().map(|p| p.0).fold(xmin * 10.0, f64::max);
    let ymax = pts()
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(1.0f64, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption(&l.title, (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin * 0.7..xmax * 1.4).log_scale(), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(l.x_label.as_str())
        .y_desc(l.y_label.as_str())
        .x_label_formatter(&|x: &f64| {
            if *x >= 1000.0 {
                format!("{}k", (x / 1000.0).round())
            } else {
                format!("{}", x.round())
            }
        })
        .label_style((FONT, 13))
        .draw()
        .map_err(err)?;
    for (k, (name, v)) in l.series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let v: Vec<(f64, f64)> = v.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(v.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
        chart
            .draw_series(v.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

enum Panel {
    Bars(Bars),
    Lines(Lines),
}

fn png(path: &Path, panels: &[Panel], cols: usize, panel_width: u32) -> Result<()> {
    let rows = panels.len().div_ceil(cols.max(1));
    let (w, h) = (panel_width * cols as u32, 400 * rows as u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((rows, cols));
    for (area, p) in areas.iter().zip(panels) {
        match p {
            Panel::Bars(b) => draw_bars(area, b)?,
            Panel::Lines(l) => draw_lines(area, l)?,
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Every chart the results allow; returns the file names written.
pub fn write_all(r: &Results, dir: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();

    if let Some(t) = r.testrun.as_ref().filter(|t| !t.configs.is_empty()) {
        let names: Vec<String> = t
            .configs
            .first()
            .map(|c| c.scenarios.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        let max_ids = t.configs.iter().map(|c| c.identities).max().unwrap_or(0);
        let max_pol = t
            .configs
            .iter()
            .map(|c| c.policy_entries)
            .max()
            .unwrap_or(0);
        let series = |fixed: &dyn Fn(&crate::report::TestrunConfig) -> bool,
                      x: &dyn Fn(&crate::report::TestrunConfig) -> usize| {
            let mut out = vec![(
                "empty program".to_string(),
                t.configs
                    .iter()
                    .filter(|c| fixed(c))
                    .map(|c| (x(c) as f64, median(&c.empty).unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>(),
            )];
            let plotted = names.iter();
            for n in plotted {
                out.push((
                    n.clone(),
                    t.configs
                        .iter()
                        .filter(|c| fixed(c))
                        .filter_map(|c| {
                            c.scenarios
                                .iter()
                                .find(|s| &s.name == n)
                                .map(|s| (x(c) as f64, s.median_ns()))
                        })
                        .collect(),
                ));
            }
            for (_, v) in &mut out {
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            out
        };
        let panels = vec![
            Panel::Lines(Lines {
                title: format!("ns/run vs policy entries ({max_ids} identities)"),
                x_label: "policy map entries".into(),
                y_label: "ns per run".into(),
                series: series(&|c| c.identities == max_ids, &|c| c.policy_entries),
            }),
            Panel::Lines(Lines {
                title: format!("ns/run vs identities ({max_pol} policy entries)"),
                x_label: "ipcache entries (identities)".into(),
                y_label: "ns per run".into(),
                series: series(&|c| c.policy_entries == max_pol, &|c| c.identities),
            }),
        ];
        png(&dir.join("testrun.png"), &panels, 2, 560)?;
        written.push("testrun.png".into());
    }

    if let Some(v) = r.veth.as_ref().filter(|v| !v.measures.is_empty()) {
        let panels: Vec<Panel> = v
            .measures
            .iter()
            .map(|m| {
                let cats: Vec<String> = v.configs.clone();
                let ratios: Vec<f64> = cats
                    .iter()
                    .map(|c| m.ratio(c, crate::report::veth_baseline(c)))
                    .collect();
                Panel::Bars(Bars {
                    title: format!(
                        "{} ({}) relative to {}",
                        m.name,
                        m.unit,
                        if v.configs.iter().any(|c| c == "a6") {
                            "(a) / IPv6 to (a6)"
                        } else {
                            "(a)"
                        }
                    ),
                    y_label: "ratio to no enforcement".into(),
                    categories: cats,
                    series: vec![("median ratio".into(), ratios)],
                    hline: Some((0.95, "0.95 target".into())),
                })
            })
            .collect();
        png(
            &dir.join("veth.png"),
            &panels,
            panels.len().clamp(1, 3),
            700,
        )?;
        written.push("veth.png".into());
    }

    if let Some(u) = r.update.as_ref().filter(|u| !u.kinds.is_empty()) {
        let cats: Vec<String> = u.kinds.iter().map(|k| k.name.clone()).collect();
        let p = |q: f64| -> Vec<f64> {
            u.kinds
                .iter()
                .map(|k| percentile(&k.totals(), q).unwrap_or(f64::NAN))
                .collect()
        };
        let phase = |f: fn(&crate::report::UpdateSample) -> f64| -> Vec<f64> {
            u.kinds
                .iter()
                .map(|k| median(&k.phase(f)).unwrap_or(f64::NAN))
                .collect()
        };
        let panels = vec![
            Panel::Bars(Bars {
                title: "policy update latency".into(),
                y_label: "ms".into(),
                categories: cats.clone(),
                series: vec![("p50".into(), p(50.0)), ("p99".into(), p(99.0))],
                hline: Some((UPDATE_P99_MS, "p99 target".into())),
            }),
            Panel::Bars(Bars {
                title: "where the time goes (p50)".into(),
                y_label: "ms".into(),
                categories: cats,
                series: vec![
                    ("model clone".into(), phase(|s| s.build_ms)),
                    ("compile".into(), phase(|s| s.compile_ms)),
                    ("map sync".into(), phase(|s| s.apply_ms)),
                ],
                hline: None,
            }),
        ];
        png(&dir.join("update.png"), &panels, 2, 560)?;
        written.push("update.png".into());
    }

    if let Some(c) = r.cni.as_ref().filter(|c| !c.runs.is_empty()) {
        let cats: Vec<String> = c
            .runs
            .iter()
            .map(|r| {
                // Short labels: "seq, 1 namespace", "20x, 10k pods", ...
                let name = r
                    .name
                    .replace("sequential", "seq")
                    .replace(" concurrent", "x");
                let model = r.model.split([',', ':']).next().unwrap_or_default();
                format!("{name}, {model}")
            })
            .collect();
        let q = |f: fn(&crate::report::CniRunSet) -> &Vec<f64>, p: f64| -> Vec<f64> {
            c.runs
                .iter()
                .map(|r| percentile(f(r), p).unwrap_or(f64::NAN))
                .collect()
        };
        let panels = vec![Panel::Bars(Bars {
            title: "CNI latency".into(),
            y_label: "ms".into(),
            categories: cats,
            series: vec![
                ("ADD p50".into(), q(|r| &r.add_ms, 50.0)),
                ("ADD p99".into(), q(|r| &r.add_ms, 99.0)),
                ("DEL p50".into(), q(|r| &r.del_ms, 50.0)),
                ("DEL p99".into(), q(|r| &r.del_ms, 99.0)),
            ],
            hline: Some((20.0, "ADD p50 target".into())),
        })];
        png(&dir.join("cni.png"), &panels, 1, 1000)?;
        written.push("cni.png".into());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::*;

    #[test]
    fn charts_render_when_the_font_is_there() {
        if !init_font() {
            eprintln!("SKIP: no DejaVu font");
            return;
        }
        let dir = std::env::temp_dir().join(format!("palisade-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = Results {
            update: Some(Update {
                kinds: vec![UpdateKind {
                    name: "pod add".into(),
                    samples: vec![UpdateSample {
                        build_ms: 1.0,
                        compile_ms: 5.0,
                        apply_ms: 0.5,
                        total_ms: 6.5,
                        writes: 3,
                    }],
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let files = write_all(&r, &dir).unwrap();
        assert_eq!(files, ["update.png"]);
        // Degenerate inputs draw an empty panel instead of looping.
        let lines = Lines {
            title: "empty".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![("none".into(), vec![(f64::NAN, 1.0)])],
        };
        png(&dir.join("empty.png"), &[Panel::Lines(lines)], 1, 560).unwrap();
        let one = Lines {
            title: "one point".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![("one".into(), vec![(10.0, 1.0)])],
        };
        png(&dir.join("one.png"), &[Panel::Lines(one)], 1, 560).unwrap();
        let bytes = std::fs::read(dir.join("update.png")).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
