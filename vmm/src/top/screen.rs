//! The live screen of `vmm top`: a header (state, free memory, tax, sharing) and a
//! table with one row per VM, redrawn every refresh; keys sort, change the
//! interval and quit.

use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame as Screen;

use super::columns::header;
use super::{sample_loop, Column, Frame, TopError, TopOptions, MAX_INTERVAL, MIN_INTERVAL};
use crate::sample::format_value;

/// The keys, as the screen's last line shows them.
const HELP: &str = "q quit  < > sort column  n by name  + - interval";

/// Where the user has the view.
struct View {
    sort: Option<Column>,
    interval: Duration,
}

impl View {
    /// Applies a key; returns false to quit.
    fn key(&mut self, code: KeyCode) -> bool {
        let i = self.sort.and_then(|c| Column::ALL.iter().position(|x| *x == c));
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('n') => self.sort = None,
            KeyCode::Char('>') => self.sort = Some(Column::ALL[i.map_or(0, |i| (i + 1) % Column::ALL.len())]),
            KeyCode::Char('<') => {
                self.sort = Some(
                    Column::ALL[i.map_or(Column::ALL.len() - 1, |i| (i + Column::ALL.len() - 1) % Column::ALL.len())],
                )
            }
            KeyCode::Char('+') => self.interval = (self.interval * 2).min(MAX_INTERVAL),
            KeyCode::Char('-') => self.interval = (self.interval / 2).max(MIN_INTERVAL),
            _ => {}
        }
        true
    }
}

/// Draws until `q` (or the count); restores the terminal whatever happens.
pub fn run(opts: &TopOptions) -> Result<(), TopError> {
    let mut terminal = ratatui::try_init()?;
    let result = draw_loop(&mut terminal, opts);
    ratatui::try_restore()?;
    result
}

fn draw_loop(terminal: &mut ratatui::DefaultTerminal, opts: &TopOptions) -> Result<(), TopError> {
    let mut view = View { sort: opts.sort, interval: opts.interval };
    sample_loop(opts, |f, last| {
        terminal.draw(|s| draw(s, f, &view))?;
        if last {
            return Ok(true);
        }
        // Wait out the interval, redrawing at once after a key.
        let until = Instant::now() + view.interval;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(k) = event::read()? {
                if k.kind == KeyEventKind::Press && !view.key(k.code) {
                    return Ok(false);
                }
                terminal.draw(|s| draw(s, f, &view))?;
            }
        }
        Ok(true)
    })
}

fn draw(s: &mut Screen, f: &Frame, view: &View) {
    let [head, table, help] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(3), Constraint::Length(1)]).areas(s.area());
    let mut lines: Vec<Line> = header(&f.now).into_iter().map(Line::from).collect();
    lines.push(Line::from(format!(
        "refresh {:.1}s  sorted by {}  up {:.0}s",
        view.interval.as_secs_f64(),
        view.sort.map_or("name", Column::name),
        f.t_s
    )));
    s.render_widget(Paragraph::new(lines), head);
    let bold = Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED);
    let mut names = vec![Cell::from("NAME"), Cell::from("STATE")];
    names.extend(Column::ALL.iter().map(|c| {
        let text = if Some(*c) == view.sort { format!("{}*", c.name()) } else { c.name().to_string() };
        Cell::from(text)
    }));
    let rows = f.rows(view.sort).into_iter().map(|(name, state, values)| {
        let mut cells = vec![Cell::from(name), Cell::from(state)];
        cells.extend(values.into_iter().map(|v| Cell::from(format_value(v))));
        Row::new(cells)
    });
    let mut widths = vec![Constraint::Length(10), Constraint::Length(9)];
    widths.extend(Column::ALL.iter().map(|c| Constraint::Length(c.name().len().max(7) as u16 + 1)));
    s.render_widget(Table::new(rows, widths).header(Row::new(names).style(bold)), table);
    s.render_widget(Paragraph::new(HELP), help);
}
