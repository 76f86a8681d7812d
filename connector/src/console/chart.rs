//! Charts as inline SVG, drawn on the server: bars with their DP 95%
//! intervals, and budget spent over time against its limit. Presentation
//! attributes only (no `style`), so the Content-Security-Policy holds.

use super::html::esc;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 300.0;
/// Room for the axis labels.
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 60.0;
const TOP: f64 = 16.0;

/// One bar: its label, its value and, where the answer carries one, the
/// half-width of its 95% interval.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub half_width: Option<f64>,
}

/// A bar chart (`svg#<id>`): one `rect.bar` per bar, and one
/// `line.interval` per bar that has an interval, from value − h to
/// value + h.
pub fn bars(id: &str, title: &str, bars: &[Bar]) -> String {
    let (low, high) = range(bars.iter().flat_map(|b| {
        let h = b.half_width.unwrap_or(0.0);
        [b.value - h, b.value + h]
    }));
    let y = |v: f64| TOP + (high - v) / (high - low) * (HEIGHT - TOP - BOTTOM);
    let slot = (WIDTH - LEFT) / bars.len().max(1) as f64;
    let mut svg = frame(id, title, low, high, &y);
    for (i, bar) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let w = slot * 0.7;
        let (top, bottom) = (y(bar.value.max(0.0)), y(bar.value.min(0.0)));
        svg.push_str(&format!(
            "<rect class=\"bar\" x=\"{x:.1}\" y=\"{top:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"#5b8def\"><title>{label}: {value}</title></rect>",
            h = (bottom - top).max(0.5),
            label = esc(&bar.label),
            value = number(bar.value),
        ));
        if let Some(h) = bar.half_width {
            let cx = x + w / 2.0;
            let (y1, y2) = (y(bar.value + h), y(bar.value - h));
            svg.push_str(&format!(
                "<line class=\"interval\" x1=\"{cx:.1}\" y1=\"{y1:.1}\" x2=\"{cx:.1}\" y2=\"{y2:.1}\" stroke=\"#222\" stroke-width=\"2\"><title>95%: {lo} to {hi}</title></line>\
                 <line x1=\"{a:.1}\" y1=\"{y1:.1}\" x2=\"{b:.1}\" y2=\"{y1:.1}\" stroke=\"#222\"/>\
                 <line x1=\"{a:.1}\" y1=\"{y2:.1}\" x2=\"{b:.1}\" y2=\"{y2:.1}\" stroke=\"#222\"/>",
                lo = number(bar.value - h),
                hi = number(bar.value + h),
                a = cx - w / 6.0,
                b = cx + w / 6.0,
            ));
        }
        let lx = x + w / 2.0;
        let ly = HEIGHT - BOTTOM + 14.0;
        svg.push_str(&format!(
            "<text x=\"{lx:.1}\" y=\"{ly:.1}\" font-size=\"11\" text-anchor=\"end\" transform=\"rotate(-35 {lx:.1} {ly:.1})\">{}</text>",
            esc(&shorten(&bar.label))
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// A running total over time (`svg#<id>`): `polyline.spent` through the
/// points (x: seconds from the first), and `line.limit` at the limit.
pub fn spent_over_time(id: &str, title: &str, points: &[(f64, f64)], limit: Option<f64>) -> String {
    let values = points
        .iter()
        .map(|p| p.1)
        .chain(limit)
        .chain(std::iter::once(0.0));
    let (low, high) = range(values);
    let y = |v: f64| TOP + (high - v) / (high - low) * (HEIGHT - TOP - BOTTOM);
    let (first, last) = match (points.first(), points.last()) {
        (Some(f), Some(l)) => (f.0, l.0.max(f.0 + 1.0)),
        _ => (0.0, 1.0),
    };
    let x = |t: f64| LEFT + (t - first) / (last - first) * (WIDTH - LEFT - 10.0);
    let mut svg = frame(id, title, low, high, &y);
    if let Some(limit) = limit {
        svg.push_str(&format!(
            "<line class=\"limit\" x1=\"{LEFT}\" y1=\"{v:.1}\" x2=\"{WIDTH}\" y2=\"{v:.1}\" stroke=\"#c0392b\" stroke-dasharray=\"6 4\"><title>limit {l}</title></line>\
             <text x=\"{tx}\" y=\"{ty:.1}\" font-size=\"11\" fill=\"#c0392b\" text-anchor=\"end\">limit {l}</text>",
            v = y(limit),
            l = number(limit),
            tx = WIDTH - 4.0,
            ty = y(limit) - 4.0,
        ));
    }
    // A step line: the total holds until the next charge.
    let mut path = Vec::new();
    let mut previous = 0.0;
    for &(t, total) in points {
        path.push(format!("{:.1},{:.1}", x(t), y(previous)));
        path.push(format!("{:.1},{:.1}", x(t), y(total)));
        previous = total;
    }
    svg.push_str(&format!(
        "<polyline class=\"spent\" points=\"{}\" fill=\"none\" stroke=\"#5b8def\" stroke-width=\"2\"/>",
        path.join(" ")
    ));
    svg.push_str("</svg>");
    svg
}

/// The SVG element, its title, and the value axis with three ticks.
fn frame(id: &str, title: &str, low: f64, high: f64, y: &dyn Fn(f64) -> f64) -> String {
    let mut svg = format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" role=\"img\" aria-label=\"{t}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{t}</title>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\" stroke=\"#888\"/>\
         <line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{WIDTH}\" y2=\"{b}\" stroke=\"#888\"/>",
        t = esc(title),
        b = HEIGHT - BOTTOM,
    );
    for v in [low, (low + high) / 2.0, high] {
        svg.push_str(&format!(
            "<text x=\"{x}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            number(v),
            x = LEFT - 6.0,
            ty = y(v) + 4.0,
        ));
    }
    if low < 0.0 && high > 0.0 {
        svg.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{z:.1}\" x2=\"{WIDTH}\" y2=\"{z:.1}\" stroke=\"#bbb\"/>",
            z = y(0.0)
        ));
    }
    svg
}

/// The value range drawn: always includes 0, never empty.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut low, mut high) = (0.0f64, 0.0f64);
    for v in values.filter(|v| v.is_finite()) {
        low = low.min(v);
        high = high.max(v);
    }
    if (high - low).abs() < f64::EPSILON {
        high = low + 1.0;
    }
    let pad = (high - low) * 0.05;
    (if low < 0.0 { low - pad } else { low }, high + pad)
}

/// A number as a person reads it: at most four significant decimals.
pub fn number(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn shorten(label: &str) -> String {
    match label.chars().count() {
        n if n <= 18 => label.to_string(),
        _ => label.chars().take(17).chain(['…']).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bar_with_an_interval_has_one() {
        let svg = bars(
            "chart",
            "t",
            &[
                Bar {
                    label: "<a>".into(),
                    value: 10.0,
                    half_width: Some(2.5),
                },
                Bar {
                    label: "b".into(),
                    value: -3.0,
                    half_width: None,
                },
            ],
        );
        assert_eq!(svg.matches("class=\"bar\"").count(), 2);
        assert_eq!(svg.matches("class=\"interval\"").count(), 1);
        assert!(svg.contains("&lt;a&gt;") && !svg.contains("<a>"));
        assert!(svg.contains("95%: 7.5 to 12.5"));
    }

    #[test]
    fn the_limit_is_drawn() {
        let svg = spent_over_time("eps", "ε", &[(0.0, 0.5), (60.0, 1.5)], Some(10.0));
        assert!(svg.contains("class=\"limit\"") && svg.contains("limit 10"));
        assert!(svg.contains("class=\"spent\""));
    }
}
