//! The feedback scheduler (HybridGen, Algorithm 1): from measured per-step times it chooses how
//! many host tokens the CPU selects (K) and how it selects them.
//!
//! * Start at `K = k_min` with Post-QKT (logits over every host token, then top-K).
//! * While the CPU side is hidden (`T_cpu + T_tx ≤ T_gpu`), grow K toward `k_max`.
//! * When it is not, shrink K toward `k_min`; once K is `k_min` and the CPU is still the
//!   bottleneck for `confirm` consecutive steps, switch to Pre-QKT (logits over a predicted subset
//!   only). One slow step (a busy machine, a page fault storm) only shrinks K once, which the
//!   following steps grow back; it never flips the strategy, which takes `patience` steps to undo.
//! * In Pre-QKT, after `patience` consecutive steps with the CPU side under `slack × T_gpu`,
//!   return to Post-QKT at `k_min` (Post-QKT costs more per step, so only with room to spare).
//!
//! Pure logic over the times it is given: deterministic and testable with synthetic timings.

use crate::ensure;
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Logits over all host tokens, then top-K by logit.
    PostQkt,
    /// Logits over K tokens chosen ahead of them (by the page summaries of the keys, or by
    /// position: the Python policy's `predictor`).
    PreQkt,
}

impl Strategy {
    pub const ALL: [Strategy; 2] = [Strategy::PostQkt, Strategy::PreQkt];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::PostQkt => "post_qkt",
            Strategy::PreQkt => "pre_qkt",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Smallest K (from offline accuracy profiling): never gone below.
    pub k_min: usize,
    pub k_max: usize,
    /// K multiplies by this when the CPU is hidden (at least +1).
    pub grow: f64,
    /// K multiplies by this when the CPU is the bottleneck (at least -1).
    pub shrink: f64,
    /// Pre-QKT returns to Post-QKT only when `T_cpu + T_tx ≤ slack × T_gpu` ...
    pub slack: f64,
    /// ... for this many consecutive steps.
    pub patience: u32,
    /// Post-QKT switches to Pre-QKT only after this many consecutive CPU-bound steps at `k_min`.
    pub confirm: u32,
}

impl SchedulerConfig {
    pub fn new(k_min: usize, k_max: usize) -> Self {
        SchedulerConfig {
            k_min,
            k_max,
            grow: 1.25,
            shrink: 0.8,
            slack: 0.5,
            patience: 8,
            confirm: 3,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.k_min >= 1, "k_min must be >= 1, got {}", self.k_min);
        ensure!(
            self.k_min <= self.k_max,
            "k_min ({}) must not exceed k_max ({})",
            self.k_min,
            self.k_max
        );
        ensure!(
            self.grow.is_finite() && self.grow > 1.0,
            "grow must be > 1, got {}",
            self.grow
        );
        ensure!(
            self.shrink > 0.0 && self.shrink < 1.0,
            "shrink must be in (0, 1), got {}",
            self.shrink
        );
        ensure!(
            self.slack > 0.0 && self.slack <= 1.0,
            "slack must be in (0, 1], got {}",
            self.slack
        );
        ensure!(
            self.confirm >= 1,
            "confirm must be >= 1, got {}",
            self.confirm
        );
        Ok(())
    }
}

/// Times of one decode step, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct StepTimes {
    /// Device work the CPU side can hide behind.
    pub gpu: f64,
    /// CPU stage (logits, selection, gather or partial attention).
    pub cpu: f64,
    /// Transfer of the CPU results to the device.
    pub tx: f64,
}

#[derive(Clone, Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    k: usize,
    strategy: Strategy,
    slack_streak: u32,
    /// Consecutive CPU-bound steps at `k_min` in Post-QKT.
    bound_streak: u32,
    steps: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Scheduler {
            k: cfg.k_min,
            cfg,
            strategy: Strategy::PostQkt,
            slack_streak: 0,
            bound_streak: 0,
            steps: 0,
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Feeds one step's times; returns the K and strategy for the next step.
    pub fn observe(&mut self, t: StepTimes) -> Result<(usize, Strategy)> {
        for (name, v) in [("gpu", t.gpu), ("cpu", t.cpu), ("tx", t.tx)] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "time {name} must be finite and >= 0, got {v}"
            );
        }
        self.steps += 1;
        let cpu_side = t.cpu + t.tx;
        let hidden = cpu_side <= t.gpu;
        match self.strategy {
            Strategy::PostQkt => {
                let at_floor = self.k == self.cfg.k_min;
                self.bound_streak = if !hidden && at_floor {
                    self.bound_streak + 1
                } else {
                    0
                };
                if hidden {
                    self.grow();
                } else if !at_floor {
                    self.shrink();
                } else if self.bound_streak >= self.cfg.confirm {
                    self.strategy = Strategy::PreQkt;
                    self.slack_streak = 0;
                    self.bound_streak = 0;
                }
            }
            Strategy::PreQkt => {
                self.slack_streak = if cpu_side <= self.cfg.slack * t.gpu {
                    self.slack_streak + 1
                } else {
                    0
                };
                if self.slack_streak >= self.cfg.patience {
                    self.strategy = Strategy::PostQkt;
                    self.k = self.cfg.k_min;
                    self.slack_streak = 0;
                } else if hidden {
                    self.grow();
                } else {
                    self.shrink();
                }
            }
        }
        Ok((self.k, self.strategy))
    }

    fn grow(&mut self) {
        let next = ((self.k as f64) * self.cfg.grow).ceil() as usize;
        self.k = next.max(self.k + 1).min(self.cfg.k_max);
    }

    fn shrink(&mut self) {
        let next = ((self.k as f64) * self.cfg.shrink).floor() as usize;
        self.k = next.min(self.k.saturating_sub(1)).max(self.cfg.k_min);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(gpu: f64, cpu: f64, tx: f64) -> StepTimes {
        StepTimes { gpu, cpu, tx }
    }

    #[test]
    fn starts_at_k_min_post_qkt() {
        let s = Scheduler::new(SchedulerConfig::new(64, 4096)).unwrap();
        assert_eq!((s.k(), s.strategy()), (64, Strategy::PostQkt));
    }

    #[test]
    fn grows_while_hidden_up_to_k_max() {
        let mut s = Scheduler::new(SchedulerConfig::new(64, 1000)).unwrap();
        let mut last = s.k();
        for _ in 0..100 {
            let (k, st) = s.observe(times(10.0, 3.0, 1.0)).unwrap();
            assert!(k >= last && k <= 1000);
            assert_eq!(st, Strategy::PostQkt);
            last = k;
        }
        assert_eq!(last, 1000);
    }

    #[test]
    fn shrinks_when_cpu_is_the_bottleneck_never_below_k_min_then_switches() {
        let mut s = Scheduler::new(SchedulerConfig::new(64, 4096)).unwrap();
        for _ in 0..20 {
            s.observe(times(10.0, 1.0, 1.0)).unwrap();
        }
        let high = s.k();
        assert!(high > 1000);
        let mut prev = high;
        let mut switched_at = None;
        for step in 0..100 {
            let (k, st) = s.observe(times(10.0, 12.0, 1.0)).unwrap();
            assert!(k >= 64 && k <= prev);
            prev = k;
            if st == Strategy::PreQkt {
                switched_at = Some(step);
                assert_eq!(k, 64, "switches only once K is at k_min");
                break;
            }
        }
        assert!(switched_at.is_some());
    }

    #[test]
    fn one_slow_step_does_not_flip_the_strategy() {
        let mut s = Scheduler::new(SchedulerConfig::new(64, 4096)).unwrap();
        for step in 0..40 {
            // The CPU side is hidden except for two isolated slow steps, one of them at k_min.
            let cpu = if step == 0 || step == 20 { 50.0 } else { 2.0 };
            let (_, st) = s.observe(times(10.0, cpu, 0.5)).unwrap();
            assert_eq!(st, Strategy::PostQkt, "step {step}");
        }
        assert!(s.k() > 1000, "K grew back after the slow step: {}", s.k());
        // A CPU that stays the bottleneck at k_min is confirmed and switched after `confirm` steps.
        let mut s = Scheduler::new(SchedulerConfig::new(64, 4096)).unwrap();
        let strategies: Vec<_> = (0..3)
            .map(|_| s.observe(times(1.0, 5.0, 0.0)).unwrap().1)
            .collect();
        assert_eq!(
            strategies,
            [Strategy::PostQkt, Strategy::PostQkt, Strategy::PreQkt]
        );
    }

    #[test]
    fn pre_qkt_returns_to_post_qkt_after_patience_steps_of_slack() {
        let mut cfg = SchedulerConfig::new(8, 64);
        cfg.patience = 3;
        let mut s = Scheduler::new(cfg).unwrap();
        for _ in 0..3 {
            s.observe(times(1.0, 5.0, 0.0)).unwrap(); // confirmed over `confirm` steps
        }
        assert_eq!(s.strategy(), Strategy::PreQkt);
        // Hidden but without enough slack: stays in Pre-QKT and grows.
        s.observe(times(1.0, 0.8, 0.0)).unwrap();
        assert_eq!((s.strategy(), s.k()), (Strategy::PreQkt, 10));
        for _ in 0..2 {
            s.observe(times(1.0, 0.1, 0.1)).unwrap();
            assert_eq!(s.strategy(), Strategy::PreQkt);
        }
        let (k, st) = s.observe(times(1.0, 0.1, 0.1)).unwrap();
        assert_eq!((k, st), (8, Strategy::PostQkt));
    }

    #[test]
    fn deterministic_for_the_same_timings() {
        let run = || {
            let mut s = Scheduler::new(SchedulerConfig::new(16, 512)).unwrap();
            (0..200)
                .map(|i| s.observe(times(1.0, (i % 7) as f64 * 0.3, 0.05)).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn rejects_bad_configs_and_times() {
        assert!(Scheduler::new(SchedulerConfig::new(0, 10)).is_err());
        assert!(Scheduler::new(SchedulerConfig::new(11, 10)).is_err());
        let mut s = Scheduler::new(SchedulerConfig::new(1, 10)).unwrap();
        assert!(s.observe(times(f64::NAN, 1.0, 1.0)).is_err());
        assert!(s.observe(times(1.0, -1.0, 1.0)).is_err());
    }
}
