//! The generator's input: the paper's labelled parts, in ChatML (the chat format of SmolLM2 and
//! Qwen2.5). The assistant turn starts with the passage start, so the model continues it.

/// The paper's instruction.
pub const INSTRUCTION: &str = "Finish the passage in the user voice.";

/// Default system message.
pub const DEFAULT_SYSTEM: &str =
    "You are a ghostwriter. You continue a person's text exactly the way that person writes.";

/// The paper's labelled parts.
#[derive(Debug, Clone, Default)]
pub struct Parts {
    /// Immediate context x_t.
    pub passage_start: String,
    /// Summary of the ranked entries.
    pub summary: String,
    /// Important words.
    pub important_words: Vec<String>,
    /// Ranked entries.
    pub past_passages: Vec<String>,
    /// Leave the labelled passage start out of the instruction (generation still continues it).
    pub omit_passage_start: bool,
}

/// A chat prompt: everything before the assistant's text, and the assistant's text so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The rendered prompt, ending inside the assistant turn.
    pub text: String,
}

fn chatml(system: &str, user: &str, assistant_prefix: &str) -> Prompt {
    Prompt {
        text: format!(
            "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant_prefix}"
        ),
    }
}

/// The personalized prompt: instruction, passage start, summary, important words and past
/// passages, each under its label (parts that are empty are left out); the assistant turn
/// begins with the passage start.
pub fn personalized(system: &str, parts: &Parts) -> Prompt {
    let mut user = format!("{INSTRUCTION}\n");
    if !parts.omit_passage_start {
        user.push_str(&format!("\npassage start: {}\n", parts.passage_start));
    }
    if !parts.summary.trim().is_empty() {
        user.push_str(&format!("\nsummary: {}\n", parts.summary.trim()));
    }
    if !parts.important_words.is_empty() {
        user.push_str(&format!(
            "\nimportant words: {}\n",
            parts.important_words.join(", ")
        ));
    }
    if !parts.past_passages.is_empty() {
        user.push_str("\npast passages:\n");
        for p in &parts.past_passages {
            user.push_str(&format!("- {}\n", p.trim()));
        }
    }
    chatml(system, user.trim_end(), &parts.passage_start)
}

/// A plain instruction answered as a chat turn.
pub fn instruction(system: &str, instruction: &str) -> Prompt {
    chatml(system, instruction.trim(), "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_every_part_and_continues_the_start() {
        let p = personalized(
            "sys",
            &Parts {
                passage_start: "Great strings".into(),
                summary: "Likes bright tone.".into(),
                important_words: vec!["tone".into(), "strings".into()],
                past_passages: vec!["These picks rock.".into()],
                omit_passage_start: false,
            },
        );
        for label in [
            INSTRUCTION,
            "passage start: Great strings",
            "summary: Likes bright tone.",
            "important words: tone, strings",
            "past passages:\n- These picks rock.",
        ] {
            assert!(p.text.contains(label), "{label} missing in {}", p.text);
        }
        let omitted = personalized(
            "sys",
            &Parts {
                passage_start: "Great strings".into(),
                omit_passage_start: true,
                ..Default::default()
            },
        );
        assert!(!omitted.text.contains("passage start:"));
        assert!(
            omitted
                .text
                .ends_with("<|im_start|>assistant\nGreat strings"),
            "generation still continues it"
        );
        assert!(p.text.ends_with("<|im_start|>assistant\nGreat strings"));
        let bare = personalized(
            "sys",
            &Parts {
                passage_start: "x".into(),
                ..Default::default()
            },
        );
        assert!(!bare.text.contains("summary:") && !bare.text.contains("past passages"));
    }
}
