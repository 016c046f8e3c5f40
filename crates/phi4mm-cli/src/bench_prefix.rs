//! `phi4mm bench --turn2`: what the prefix cache saves a chat. Turn 1 asks about the `--image`
//! (and/or `--audio`); turn 2 re-sends the conversation with the reply and a follow-up
//! question. Turn 2's time to first token (request preparation included) is measured cold — a
//! scheduler without caches, as `Engine::generate` runs it — and warm, on the scheduler that
//! served turn 1; both generate to the end and must give the same tokens.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use phi4mm::{Completion, Engine, Event, GenerateRequest, MediaInput, Message, PromptInput, Scheduler, SchedulerOptions};

/// Runs `req` on `sched`; (time to first token, completion).
fn timed(sched: &mut Scheduler, req: GenerateRequest) -> Result<(f64, Completion)> {
    let t = Instant::now();
    let id = sched.submit(req)?;
    let mut first = None;
    let c = sched.run_to_end(id, |e| {
        if matches!(e, Event::Token { .. }) {
            first.get_or_insert_with(|| t.elapsed().as_secs_f64());
        }
        true
    })?;
    Ok((first.unwrap_or(f64::NAN), c))
}

/// The report as JSON.
pub fn run(engine: &Engine, opts: SchedulerOptions, image: Option<&std::path::Path>, audio: Option<&std::path::Path>, gen_tokens: usize) -> Result<serde_json::Value> {
    if image.is_none() && audio.is_none() {
        bail!("--turn2 needs --image FILE and/or --audio FILE");
    }
    let mut question = String::new();
    let mut t1 = GenerateRequest::new(PromptInput::Raw(String::new()));
    if let Some(p) = image {
        question.push_str("<|image_1|>");
        t1.images = vec![MediaInput::Path(p.to_path_buf())];
    }
    if let Some(p) = audio {
        question.push_str("<|audio_1|>");
        t1.audios = vec![MediaInput::Path(p.to_path_buf())];
    }
    question.push_str("What is in this?");
    t1.prompt = PromptInput::Chat(vec![Message::new("user", question.clone())]);
    t1.max_new_tokens = gen_tokens;
    t1.ignore_eos = true;
    let mut warm = Scheduler::new(engine, opts);
    let (ttft1, c1) = timed(&mut warm, t1.clone()).context("turn 1")?;
    let mut t2 = t1.clone();
    t2.prompt = PromptInput::Chat(vec![
        Message::new("user", question),
        Message::new("assistant", c1.text.clone()),
        Message::new("user", "Tell me more about the colours and the layout."),
    ]);
    let mut cold = Scheduler::new(engine, SchedulerOptions::single());
    let (ttft_cold, c_cold) = timed(&mut cold, t2.clone()).context("turn 2, cold")?;
    let (ttft_warm, c_warm) = timed(&mut warm, t2).context("turn 2, with the prefix cache")?;
    let same = c_cold.tokens == c_warm.tokens
        && c_cold.logprobs.iter().zip(&c_warm.logprobs).all(|(a, b)| a.logprob.to_bits() == b.logprob.to_bits());
    Ok(serde_json::json!({
        "turn1_prompt_tokens": c1.prompt_tokens.len(),
        "turn1_ttft_s": ttft1,
        "turn2_prompt_tokens": c_warm.prompt_tokens.len(),
        "turn2_cached_tokens": c_warm.cached_tokens,
        "turn2_ttft_cold_s": ttft_cold,
        "turn2_ttft_warm_s": ttft_warm,
        "ttft_ratio": ttft_cold / ttft_warm,
        "same_tokens_and_logprobs": same,
        "cache": warm.cache_stats(),
    }))
}
