//! The classifier: logistic regression over standardized features, trained by Newton's method
//! with an L2 penalty, and its file (weights, the n-gram IDF table, the habits' scales and the
//! provenance of the training run).

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::features::{BUCKETS, RATES, feature_names};

/// Step of the IDF table's quantization (one byte per bucket).
const IDF_STEP: f32 = 0.05;

/// Where a trained model came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Provenance {
    /// The command that retrains it.
    pub command: String,
    /// The data it was trained on.
    pub data: String,
    /// Users of the training split that gave pairs.
    pub users: usize,
    /// Training pairs (same author and not, half and half: the 1:1 prior).
    pub pairs: usize,
    /// How the pairs were built.
    pub pairs_by_kind: Vec<(String, usize)>,
    /// Seed of the pair sampling.
    pub seed: u64,
    /// L2 penalty of the regression.
    pub l2: f64,
    /// Mean log loss on the training pairs.
    pub train_log_loss: f64,
}

/// A trained verifier: everything [`crate::Verifier`] needs besides the content similarity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    /// Names of the features, in order (checked against the code's on load).
    pub features: Vec<String>,
    /// Mean of each feature over the training pairs.
    pub mean: Vec<f64>,
    /// Standard deviation of each feature over the training pairs.
    pub std: Vec<f64>,
    /// Weight of each standardized feature.
    pub weights: Vec<f64>,
    /// Intercept.
    pub bias: f64,
    /// Spread of each habit's rate across training documents (divides its difference).
    pub rate_scale: Vec<f32>,
    /// IDF of each n-gram bucket over training documents, one hex byte each (`IDF_STEP`).
    pub idf_hex: String,
    /// Where it came from.
    pub provenance: Provenance,
    #[serde(skip)]
    idf: Vec<f32>,
}

impl Model {
    /// Parses a model file and checks it against the features this code computes.
    pub fn from_json(json: &str) -> Result<Self, Error> {
        let mut m: Model =
            serde_json::from_str(json).map_err(|e| Error::Model(format!("unreadable: {e}")))?;
        let names = feature_names();
        if m.features != names {
            return Err(Error::Model(format!(
                "trained on other features ({} named, {} computed): retrain it",
                m.features.len(),
                names.len()
            )));
        }
        let n = names.len();
        if m.mean.len() != n || m.std.len() != n || m.weights.len() != n {
            return Err(Error::Model("feature vectors of the wrong length".into()));
        }
        if m.rate_scale.len() != RATES {
            return Err(Error::Model("habit scales of the wrong length".into()));
        }
        m.idf = decode_idf(&m.idf_hex)?;
        Ok(m)
    }

    /// The IDF of each n-gram bucket.
    pub fn idf(&self) -> &[f32] {
        &self.idf
    }

    /// The logit and each feature's contribution to it (its weight times its standardized
    /// value: how far it moves the judgement from that of an average pair).
    pub fn logit(&self, x: &[f64]) -> (f64, Vec<f64>) {
        let contributions: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| self.weights[i] * (v - self.mean[i]) / self.std[i])
            .collect();
        (self.bias + contributions.iter().sum::<f64>(), contributions)
    }

    /// Fits the regression to `(features, same author)` pairs; `idf` and `rate_scale` are stored
    /// with it.
    // Matrix code reads best with indices.
    #[allow(clippy::needless_range_loop)]
    pub fn fit(
        x: &[Vec<f64>],
        y: &[bool],
        l2: f64,
        idf: &[f32],
        rate_scale: Vec<f32>,
        provenance: Provenance,
    ) -> Result<Self, Error> {
        let names = feature_names();
        let d = names.len();
        if x.is_empty() || x.len() != y.len() || x.iter().any(|r| r.len() != d) {
            return Err(Error::Model("no pairs, or pairs of the wrong shape".into()));
        }
        let n = x.len() as f64;
        let mut mean = vec![0.0; d];
        for r in x {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / n;
            }
        }
        let mut std = vec![0.0; d];
        for r in x {
            for j in 0..d {
                std[j] += (r[j] - mean[j]).powi(2) / n;
            }
        }
        for s in &mut std {
            *s = s.sqrt().max(1e-9);
        }
        let z: Vec<Vec<f64>> = x
            .iter()
            .map(|r| (0..d).map(|j| (r[j] - mean[j]) / std[j]).collect())
            .collect();
        // Newton's method on the penalized log loss; the intercept (index d) is not penalized.
        let mut w = vec![0.0; d + 1];
        for _ in 0..50 {
            let mut grad = vec![0.0; d + 1];
            let mut hess = vec![vec![0.0; d + 1]; d + 1];
            for (row, &label) in z.iter().zip(y) {
                let t: f64 = w[d] + row.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>();
                let p = sigmoid(t);
                let g = p - f64::from(u8::from(label));
                let h = p * (1.0 - p);
                for j in 0..=d {
                    let xj = if j == d { 1.0 } else { row[j] };
                    grad[j] += g * xj;
                    for k in j..=d {
                        let xk = if k == d { 1.0 } else { row[k] };
                        hess[j][k] += h * xj * xk;
                    }
                }
            }
            for j in 0..=d {
                for k in 0..j {
                    hess[j][k] = hess[k][j];
                }
            }
            for j in 0..d {
                grad[j] += l2 * w[j];
                hess[j][j] += l2;
            }
            let step = solve(hess, grad)
                .ok_or_else(|| Error::Model("the regression did not converge".into()))?;
            let mut change = 0.0f64;
            for j in 0..=d {
                w[j] -= step[j];
                change = change.max(step[j].abs());
            }
            if change < 1e-8 {
                break;
            }
        }
        let mut provenance = provenance;
        provenance.l2 = l2;
        provenance.train_log_loss = z
            .iter()
            .zip(y)
            .map(|(row, &label)| {
                let p = sigmoid(w[d] + row.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>())
                    .clamp(1e-12, 1.0 - 1e-12);
                if label { -p.ln() } else { -(1.0 - p).ln() }
            })
            .sum::<f64>()
            / n;
        let idf_hex = encode_idf(idf);
        Ok(Model {
            features: names,
            mean,
            std,
            bias: w[d],
            weights: w[..d].to_vec(),
            rate_scale,
            idf: decode_idf(&idf_hex)?,
            idf_hex,
            provenance,
        })
    }
}

/// The logistic function.
pub fn sigmoid(t: f64) -> f64 {
    1.0 / (1.0 + (-t).exp())
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
#[allow(clippy::needless_range_loop)]
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            if f == 0.0 {
                continue;
            }
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

fn encode_idf(idf: &[f32]) -> String {
    idf.iter()
        .map(|v| format!("{:02x}", (v / IDF_STEP).round().clamp(0.0, 255.0) as u8))
        .collect()
}

fn decode_idf(hex: &str) -> Result<Vec<f32>, Error> {
    if hex.len() != 2 * BUCKETS {
        return Err(Error::Model(format!(
            "IDF table of {} buckets, not {BUCKETS}",
            hex.len() / 2
        )));
    }
    (0..BUCKETS)
        .map(|i| {
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map(|q| f32::from(q) * IDF_STEP)
                .map_err(|_| Error::Model("IDF table is not hex".into()))
        })
        .collect()
}

/// IDF of each bucket over `documents` (each a list of the buckets it holds): `ln((N + 1) /
/// (df + 1)) + 1`, smoothed as scikit-learn's.
pub fn idf_of<'a>(documents: impl Iterator<Item = &'a [(u32, f32)]>) -> Vec<f32> {
    let mut df = vec![0u32; BUCKETS];
    let mut n = 0u32;
    for d in documents {
        n += 1;
        for &(b, _) in d {
            df[b as usize] += 1;
        }
    }
    df.iter()
        .map(|&f| ((f64::from(n) + 1.0) / (f64::from(f) + 1.0)).ln() as f32 + 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_regression_learns_a_separable_feature_and_round_trips() {
        let d = feature_names().len();
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..200 {
            let same = i % 2 == 0;
            let mut r: Vec<f64> = (0..d)
                .map(|j| ((i * 7 + j * 13) % 17) as f64 / 17.0)
                .collect();
            // The first feature says it, with noise.
            r[0] = if same { 0.6 } else { 0.4 } + ((i * 31) % 11) as f64 / 50.0;
            x.push(r);
            y.push(same);
        }
        let idf = vec![1.5; BUCKETS];
        let m = Model::fit(&x, &y, 1.0, &idf, vec![1.0; RATES], Provenance::default()).unwrap();
        assert!(m.weights[0] > 0.5, "{:?}", m.weights);
        let json = serde_json::to_string(&m).unwrap();
        let back = Model::from_json(&json).unwrap();
        assert_eq!(back.idf()[7], 1.5);
        let (t, parts) = back.logit(&x[0]);
        assert!((t - back.bias - parts.iter().sum::<f64>()).abs() < 1e-9);
        assert!(sigmoid(back.logit(&x[0]).0) > sigmoid(back.logit(&x[1]).0));
    }
}
