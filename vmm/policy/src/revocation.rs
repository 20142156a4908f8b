//! Who gives memory: min-funding revocation with an idle memory tax (Waldspurger,
//! OSDI 2002, section 5).
//!
//! Memory is taken first from the client with the lowest adjusted shares-per-page
//! ratio `rho = S / (P * (f + k * (1 - f)))`: `S` its shares, `P` the pages it
//! holds, `f` the fraction of them it uses actively, and `k = 1 / (1 - tau)` the
//! cost of an idle page for a tax rate `0 <= tau < 1` (at the ESX default 0.75 an
//! idle page costs four active ones). With `tau = 0` this is plain proportional
//! share. As a client gives, its `P` shrinks and its `rho` rises, so the amount
//! spreads over the clients until their ratios meet.

/// One VM as revocation sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Client {
    /// Its shares (`S`); at least 1 is used.
    pub shares: u64,
    /// Pages it holds now (`P`).
    pub pages: u64,
    /// Fraction of its pages in active use (`f`, clamped to 0..=1).
    pub active_fraction: f64,
    /// Most pages it can give in this call (reservations, balloon room, ...).
    pub available: u64,
}

/// Cost of an idle page relative to an active one, `k = 1 / (1 - tau)`; `tau` is
/// clamped to `0..=0.99` so that `k` stays finite.
pub fn idle_page_cost(tau: f64) -> f64 {
    1.0 / (1.0 - tau.clamp(0.0, 0.99))
}

/// Splits `amount` pages among `clients` by min-funding revocation: repeatedly
/// takes a chunk (1/64 of the amount) from the client with the lowest adjusted
/// ratio that can still give. Returns what each gives, in `clients`' order; the
/// sum is less than `amount` only when the clients cannot give more.
pub fn min_funding(amount: u64, clients: &[Client], tau: f64) -> Vec<u64> {
    let mut take = vec![0u64; clients.len()];
    let k = idle_page_cost(tau);
    let chunk = (amount / 64).max(1);
    let mut left = amount;
    while left > 0 {
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in clients.iter().enumerate() {
            if take[i] >= c.available {
                continue;
            }
            let pages = c.pages.saturating_sub(take[i]).max(1) as f64;
            let f = c.active_fraction.clamp(0.0, 1.0);
            let rho = c.shares.max(1) as f64 / (pages * (f + k * (1.0 - f)));
            if best.is_none_or(|(_, r)| rho < r) {
                best = Some((i, rho));
            }
        }
        let Some((i, _)) = best else { break };
        let t = chunk.min(left).min(clients[i].available - take[i]);
        take[i] += t;
        left -= t;
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB_PAGES: u64 = (1 << 30) / 4096;

    fn client(active_fraction: f64, available: u64) -> Client {
        Client { shares: 16 * GIB_PAGES, pages: 8 * GIB_PAGES, active_fraction, available }
    }

    #[test]
    fn idle_tax_takes_from_the_idle_vm() {
        let amount = GIB_PAGES;
        let both = |idle_avail, busy_avail| [client(0.1, idle_avail), client(1.0, busy_avail)];
        // No tax: equal shares and pages give equally.
        let g = min_funding(amount, &both(u64::MAX, u64::MAX), 0.0);
        assert!(g[0].abs_diff(g[1]) <= amount / 32, "{g:?}");
        assert_eq!(g[0] + g[1], amount);
        // tau = 0.75: the idle VM gives (almost) everything.
        let g = min_funding(amount, &both(u64::MAX, u64::MAX), 0.75);
        assert!(g[0] > 9 * g[1], "{g:?}");
        // Limited availability is respected.
        let g = min_funding(amount, &both(10, u64::MAX), 0.75);
        assert_eq!(g[0], 10);
        assert_eq!(g[1], amount - 10);
        // Nothing available: nothing taken.
        assert_eq!(min_funding(amount, &both(0, 0), 0.75), vec![0, 0]);
    }

    #[test]
    fn shares_weigh_what_each_keeps() {
        // Twice the shares, same pages, both busy: the other one gives first, until
        // its pages are half as many.
        let rich = Client { shares: 2000, pages: 1000, active_fraction: 1.0, available: u64::MAX };
        let poor = Client { shares: 1000, ..rich };
        let g = min_funding(900, &[rich, poor], 0.0);
        let kept = (1000 - g[0], 1000 - g[1]);
        assert!(kept.0.abs_diff(2 * kept.1) <= 40, "{kept:?}");
    }
}
