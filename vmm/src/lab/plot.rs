//! The plots of a lab run, drawn with `plotters` as PNG (bitmap backend) and SVG.
//!
//! Text in the PNGs is drawn with DejaVu Sans, embedded in the binary (the
//! `dejavu` crate) and registered with plotters' `ab_glyph` text renderer, so a
//! machine without any font installed draws the same pictures. SVG files name the
//! font family and leave drawing the text to the viewer.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {msg}")]
pub struct PlotError {
    path: PathBuf,
    msg: String,
}

/// One line of a chart.
pub struct Series {
    /// Its legend.
    pub name: String,
    /// Its points (x, y).
    pub points: Vec<(f64, f64)>,
}

/// A shaded stretch of the x axis (a free-memory state), with its colour.
pub struct Band {
    /// From.
    pub x0: f64,
    /// To.
    pub x1: f64,
    /// Colour.
    pub color: RGBColor,
}

/// A chart: title, axis labels, lines, shaded bands.
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Shaded bands behind the lines.
    pub bands: Vec<Band>,
}

const SIZE: (u32, u32) = (960, 540);

/// Colours of the lines, in order.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; failing here is a build bug.
        let ok = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()).is_ok();
        assert!(ok, "the embedded DejaVu Sans does not load");
    });
}

impl Chart {
    /// Draws the chart to `BASE.png` and `BASE.svg`; returns both paths.
    pub fn draw(&self, base: &Path) -> Result<[PathBuf; 2], PlotError> {
        fonts();
        let png = base.with_extension("png");
        let svg = base.with_extension("svg");
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: &dyn std::fmt::Display| PlotError { path: path.clone(), msg: e.to_string() }
        };
        {
            let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            self.draw_on(&root).map_err(|e| err(&png)(&e))?;
            root.present().map_err(|e| err(&png)(&e))?;
        }
        {
            let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            self.draw_on(&root).map_err(|e| err(&svg)(&e))?;
            root.present().map_err(|e| err(&svg)(&e))?;
        }
        Ok([png, svg])
    }

    fn draw_on<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let all = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x1, mut y1) = (1e-9f64, 1e-9f64);
        let mut x0 = f64::MAX;
        for &(x, y) in all {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        for b in &self.bands {
            x1 = x1.max(b.x1);
        }
        let x0 = if x0 == f64::MAX { 0.0 } else { x0.min(0.0) };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0.0..y1 * 1.08)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for b in &self.bands {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(b.x0, 0.0), (b.x1, y1 * 1.08)],
                b.color.mix(0.25).filled(),
            )))?;
        }
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    }
}
