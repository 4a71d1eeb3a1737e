//! Redis's glob patterns (`KEYS`, `CONFIG GET`): `*`, `?`, `[abc]`, `[^abc]`, `[a-z]` and `\`
//! escapes, with Redis's handling of odd patterns (an unterminated `[` ends the class, a
//! trailing `\` matches itself). Port of `stringmatchlen` from Redis's `util.c`, including its
//! cut-off that keeps patterns with many `*` from taking exponential time.

/// Whether `string` matches `pattern` (case-sensitive, bytes).
pub(crate) fn matches(pattern: &[u8], string: &[u8]) -> bool {
    let mut give_up = false;
    match_from(pattern, string, &mut give_up)
}

fn match_from(p: &[u8], s: &[u8], give_up: &mut bool) -> bool {
    // `at` reads like the C original, where the pattern is NUL-terminated.
    let at = |i: usize| p.get(i).copied().unwrap_or(0);
    let (mut pi, mut si) = (0usize, 0usize);
    while pi < p.len() && si < s.len() {
        match p[pi] {
            b'*' => {
                while at(pi + 1) == b'*' {
                    pi += 1;
                }
                if pi + 1 == p.len() {
                    return true;
                }
                while si < s.len() {
                    if match_from(&p[pi + 1..], &s[si..], give_up) {
                        return true;
                    }
                    if *give_up {
                        return false;
                    }
                    si += 1;
                }
                // The rest of the pattern matches nowhere in the rest of the string: no longer
                // match for an earlier `*` can help either.
                *give_up = true;
                return false;
            }
            b'?' => si += 1,
            b'[' => {
                pi += 1;
                let negate = at(pi) == b'^';
                if negate {
                    pi += 1;
                }
                let c = s[si];
                let mut hit = false;
                loop {
                    if at(pi) == b'\\' && p.len() - pi >= 2 {
                        pi += 1;
                        hit |= p[pi] == c;
                    } else if at(pi) == b']' {
                        break;
                    } else if pi >= p.len() {
                        // Unterminated class: step back so the advance below ends the pattern.
                        pi -= 1;
                        break;
                    } else if p.len() - pi >= 3 && p[pi + 1] == b'-' {
                        let (lo, hi) = (p[pi].min(p[pi + 2]), p[pi].max(p[pi + 2]));
                        pi += 2;
                        hit |= (lo..=hi).contains(&c);
                    } else {
                        hit |= p[pi] == c;
                    }
                    pi += 1;
                }
                if hit == negate {
                    return false;
                }
                si += 1;
            }
            first => {
                let literal = if first == b'\\' && p.len() - pi >= 2 {
                    pi += 1;
                    p[pi]
                } else {
                    first
                };
                if literal != s[si] {
                    return false;
                }
                si += 1;
            }
        }
        pi += 1;
    }
    // Stars match the empty rest of a string (also an empty string, as in Redis 7.2+).
    if si == s.len() {
        while at(pi) == b'*' {
            pi += 1;
        }
    }
    pi >= p.len() && si == s.len()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_match_like_redis() {
        let yes: &[(&str, &str)] = &[
            ("*", ""),
            ("*", "anything"),
            ("h?llo", "hello"),
            ("h*llo", "hllo"),
            ("h*llo", "heeeello"),
            ("h[ae]llo", "hallo"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("h[b-a]llo", "hallo"),
            ("user:*", "user:1"),
            ("a\\*b", "a*b"),
            ("a[\\]]b", "a]b"),
            ("abc\\", "abc\\"),
            ("a[bc", "ab"),
            ("**a**", "xxa"),
            ("", ""),
        ];
        let no: &[(&str, &str)] = &[
            ("h?llo", "hllo"),
            ("h[ae]llo", "hillo"),
            ("h[^e]llo", "hello"),
            ("h[a-b]llo", "hcllo"),
            ("user:*", "use"),
            ("a\\*b", "axb"),
            ("abc", "ab"),
            ("ab", "abc"),
            ("", "a"),
            ("?", ""),
        ];
        for (p, s) in yes {
            assert!(
                matches(p.as_bytes(), s.as_bytes()),
                "{p:?} should match {s:?}"
            );
        }
        for (p, s) in no {
            assert!(
                !matches(p.as_bytes(), s.as_bytes()),
                "{p:?} should not match {s:?}"
            );
        }
    }

    #[test]
    fn many_stars_stay_fast() {
        let pattern = "a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b".as_bytes();
        let string = [b'a'; 200];
        assert!(!matches(pattern, &string));
    }
}
