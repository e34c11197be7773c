//! The simulated user's reaction to a suggestion: the feedback a replayed interaction
//! carries, from the suggestion's character similarity to what the user really wrote.

use device_agent::user::store::Feedback;

/// Character-level similarity of a suggestion to what the user wrote: 1 − Levenshtein
/// distance / the longer length (1: identical, 0: nothing in common).
pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    1.0 - row[b.len()] as f64 / longest as f64
}

/// The feedback a simulated user gives a suggestion, from its similarity to what they wrote:
/// at least 0.6 accepted (little to change), at least 0.3 edited, below rejected.
pub fn simulated_feedback(suggestion: &str, written: &str) -> Feedback {
    match similarity(suggestion, written) {
        s if s >= 0.6 => Feedback::Accepted,
        s if s >= 0.3 => Feedback::Edited,
        _ => Feedback::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_is_one_minus_normalized_edit_distance() {
        assert_eq!(similarity("abc", "abc"), 1.0);
        assert_eq!(similarity("", ""), 1.0);
        assert_eq!(similarity("abc", ""), 0.0);
        assert!((similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        assert_eq!(
            simulated_feedback("to be or not", "to be or not"),
            Feedback::Accepted
        );
        assert_eq!(
            simulated_feedback("xyz", "to be or not"),
            Feedback::Rejected
        );
    }
}
