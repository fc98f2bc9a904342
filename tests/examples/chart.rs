//! Draws the benchmarks' downtime chart: downtime against memory size, one
//! line per way (median of the runs), the spread of the runs as a bar.
//!
//!   cargo run -p criu-shim-tests --example chart -- SAMPLES OUT.png TITLE
//!
//! SAMPLES has one run per line: `WAY<TAB>MIB<TAB>DOWNTIME_MS`
//! (`hack/bench-migrate` and `hack/bench-cri` write it and call this).

use std::collections::BTreeMap;

use plotters::prelude::*;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

type Series = BTreeMap<String, BTreeMap<u64, Vec<f64>>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [samples, out, title] = args.as_slice() else {
        eprintln!("usage: chart SAMPLES OUT.png TITLE");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(samples).unwrap_or_else(|e| {
        eprintln!("read {samples}: {e}");
        std::process::exit(1)
    });
    let series = parse(&text);
    if series.is_empty() {
        eprintln!("{samples}: no samples");
        std::process::exit(1);
    }
    if let Err(e) = draw(&series, out, title) {
        eprintln!("draw {out}: {e}");
        std::process::exit(1);
    }
    println!("chart: {out}");
}

fn parse(text: &str) -> Series {
    let mut s = Series::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        let [way, mib, ms] = f.as_slice() else {
            continue;
        };
        let (Ok(mib), Ok(ms)) = (mib.parse::<u64>(), ms.parse::<f64>()) else {
            continue;
        };
        s.entry(way.to_string())
            .or_default()
            .entry(mib)
            .or_default()
            .push(ms);
    }
    s
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn draw(series: &Series, out: &str, title: &str) -> Result<(), Box<dyn std::error::Error>> {
    // plotters draws text with a font we give it: DejaVu (fonts-dejavu-core).
    let font: &'static [u8] = Box::leak(std::fs::read(FONT)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "DejaVuSans.ttf is not a font")?;
    let max_x = series
        .values()
        .flat_map(|s| s.keys())
        .copied()
        .max()
        .unwrap_or(1) as f64;
    let max_y = series
        .values()
        .flat_map(|s| s.values().flatten())
        .copied()
        .fold(0.0, f64::max);
    let root = BitMapBackend::new(out, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x * 1.05, 0f64..max_y / 1000.0 * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("memory of the container (MiB)")
        .y_desc("downtime (s): checkpoint start to first answer of the copy")
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (i, (way, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|(x, ys)| (*x as f64, median(ys) / 1000.0))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(way.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart.draw_series(line.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        // The runs' spread: min..max.
        chart.draw_series(points.iter().map(|(x, ys)| {
            let lo = ys.iter().copied().fold(f64::MAX, f64::min) / 1000.0;
            let hi = ys.iter().copied().fold(0.0, f64::max) / 1000.0;
            PathElement::new(
                vec![(*x as f64, lo), (*x as f64, hi)],
                color.stroke_width(1),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
