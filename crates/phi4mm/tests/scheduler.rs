//! The batching scheduler on the tiny checkpoint: a request's tokens and log-probabilities are
//! bit-identical alone and in a mixed batch of 8 (text, sampled text, image, two audios,
//! image + audio, one crossing the 4096-token LongRoPE threshold), prompts prefilled in small
//! chunks equal the one-piece prefill of `Engine::generate`, cancellation frees the sequence at
//! the next step, and a full queue or an over-budget request is a clear error. The prefix
//! cache: turn 2 of a conversation (with an image, with audio) and a repeated mixed batch
//! reuse cached blocks and media and give exactly the cold run's bits, adapters never share
//! blocks, and eviction keeps the cache inside the KV budget.

mod common;

use std::collections::HashMap;

use candle_core::DType;
use common::*;
use phi4mm::engine::Prepared;
use phi4mm::scheduler::DEFAULT_PREFILL_CHUNK;
use phi4mm::{Completion, Engine, Error, Event, GenerateRequest, MediaInput, Message, PromptInput, RequestId, SamplingParams, Scheduler, SchedulerOptions};

fn opts(max_batch: usize, prefill_chunk: usize) -> SchedulerOptions {
    SchedulerOptions { max_batch, max_queue: 16, kv_budget: 1 << 20, prefill_chunk, ..SchedulerOptions::single() }
}

fn chat(text: &str, images: &[&str], audios: &[&str]) -> GenerateRequest {
    let mut marks = String::new();
    (1..=images.len()).for_each(|i| marks.push_str(&format!("<|image_{i}|>")));
    (1..=audios.len()).for_each(|i| marks.push_str(&format!("<|audio_{i}|>")));
    let mut req = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", format!("{marks}{text}"))]));
    req.images = images.iter().map(|f| MediaInput::Path(fixtures().join("images").join(f))).collect();
    req.audios = audios.iter().map(|f| MediaInput::Path(fixtures().join("audio").join(f))).collect();
    req.max_new_tokens = 12;
    req.ignore_eos = true;
    req.top_logprobs = 3;
    req
}

/// The mixed batch: (request, prepared ids) of every mode.
fn mixed(engine: &Engine) -> Vec<(GenerateRequest, Prepared)> {
    let mut reqs = vec![
        chat("Tell me about Rust.", &[], &[]),
        chat("What is shown?", &["wide_500x300.png"], &[]),
        chat("Transcribe the audio clip into text.", &[], &["speech_1s_16k.wav"]),
        chat("Transcribe the audio clip into text.", &[], &["speech_10s_16k.wav"]),
        chat("Answer the spoken question about the image.", &["square_448x448.png"], &["speech_1s_16k.wav"]),
        chat("Write a poem.", &[], &[]),
    ];
    let sampled = &mut reqs[5].sampling;
    *sampled = SamplingParams { temperature: 0.9, top_p: 0.9, top_k: 50, min_p: 0.05, presence_penalty: 0.5, seed: 11, ..Default::default() };
    let mut out: Vec<(GenerateRequest, Prepared)> = reqs.into_iter().map(|r| { let p = engine.prepare(&r).unwrap(); (r, p) }).collect();
    // Crosses 4096 positions while generating: 4090 prompt ids + 12 tokens.
    let long: Vec<u32> = (0..4090u32).map(|i| 1000 + (i * 7919) % 50000).collect();
    let mut req = chat("", &[], &[]);
    req.max_new_tokens = 12;
    out.push((req.clone(), Prepared::text(long)));
    let mut short = req;
    short.sampling = SamplingParams { temperature: 1.0, seed: 5, frequency_penalty: 1.0, ..Default::default() };
    out.push((short, Prepared::text((0..40u32).map(|i| 500 + i * 31).collect())));
    out
}

/// Runs every request to the end; returns (tokens, logprob bits) per submission index.
fn run_all(engine: &Engine, o: SchedulerOptions, reqs: &[(GenerateRequest, Prepared)]) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut s = Scheduler::new(engine, o);
    run_on(&mut s, reqs).into_iter().map(|c| (bits(&c), c)).map(|(b, c)| (c.tokens, b)).collect()
}

fn bits(c: &Completion) -> Vec<u32> {
    c.logprobs.iter().map(|t| t.logprob.to_bits()).collect()
}

/// Runs every request to the end on `s`; the completions per submission index.
fn run_on(s: &mut Scheduler, reqs: &[(GenerateRequest, Prepared)]) -> Vec<Completion> {
    let ids: Vec<RequestId> = reqs.iter().map(|(r, p)| s.submit_prepared(r.clone(), p.clone()).unwrap()).collect();
    let mut done: HashMap<RequestId, Completion> = HashMap::new();
    for _ in 0..10_000 {
        if s.is_idle() {
            break;
        }
        for e in s.step() {
            match e {
                Event::Done { id, completion } => {
                    done.insert(id, completion);
                }
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
                _ => {}
            }
        }
        assert!(s.kv_reserved() + s.cache_stats().positions <= s.options().kv_budget, "the prefix cache stays inside the budget");
    }
    ids.iter().map(|id| done.remove(id).expect("every request ends")).collect()
}

#[test]
fn a_request_gives_the_same_bits_alone_and_in_a_mixed_batch_of_8() {
    for dtype in [DType::F32, DType::BF16] {
        let engine = load_tiny(dtype);
        let reqs = mixed(&engine);
        assert_eq!(reqs.len(), 8);
        let together = run_all(&engine, opts(8, DEFAULT_PREFILL_CHUNK), &reqs);
        for (i, (req, prep)) in reqs.iter().enumerate() {
            let alone = run_all(&engine, opts(1, DEFAULT_PREFILL_CHUNK), std::slice::from_ref(&(req.clone(), prep.clone())));
            assert_eq!(alone[0], together[i], "{dtype:?}: request {i} differs between alone and the batch of 8");
            // Engine::generate is the scheduler with one request: the same bits.
            let c = engine.generate_prepared(prep, req, |_| true).unwrap();
            let bits: Vec<u32> = c.logprobs.iter().map(|t| t.logprob.to_bits()).collect();
            assert_eq!((c.tokens, bits), together[i], "{dtype:?}: request {i} differs from Engine::generate");
        }
        // The long one really crossed the threshold and the batch really mixed modes.
        assert_eq!(together[6].0.len(), 12);
        assert_ne!(together[0].0, together[5].0);
    }
}

#[test]
fn a_cancelled_request_leaves_at_the_next_step_and_frees_its_budget() {
    let engine = load_tiny(DType::F32);
    let reqs = mixed(&engine);
    let mut long = reqs[0].0.clone();
    long.max_new_tokens = 200;
    let mut s = Scheduler::new(&engine, opts(4, 64));
    let a = s.submit_prepared(long.clone(), reqs[0].1.clone()).unwrap();
    let b = s.submit_prepared(long, reqs[0].1.clone()).unwrap();
    let mut tokens_a = 0;
    while tokens_a < 5 {
        tokens_a += s.step().iter().filter(|e| matches!(e, Event::Token { id, .. } if *id == a)).count();
    }
    let before = s.kv_reserved();
    assert!(s.cancel(a));
    assert!(!s.cancel(9999), "an unknown id is not cancelled");
    let events = s.step();
    let cancelled = events.iter().find_map(|e| match e {
        Event::Cancelled { id, completion } if *id == a => Some(completion.as_ref().map(|c| c.tokens.len())),
        _ => None,
    });
    assert_eq!(cancelled, Some(Some(tokens_a)), "the partial completion comes back with the cancellation");
    assert!(!events.iter().any(|e| matches!(e, Event::Token { id, .. } if *id == a)), "no token after the cancel");
    assert!(events.iter().any(|e| matches!(e, Event::Token { id, .. } if *id == b)), "the other goes on");
    assert_eq!(s.running(), 1);
    assert!(s.kv_reserved() < before);
    // Cancelling a request that is still queued ends it without a completion.
    let c = s.submit_prepared(reqs[1].0.clone(), reqs[1].1.clone()).unwrap();
    s.cancel(c);
    assert!(s.step().iter().any(|e| matches!(e, Event::Cancelled { id, completion: None } if *id == c)));
}

#[test]
fn a_full_queue_and_an_over_budget_request_are_clear_errors() {
    let engine = load_tiny(DType::F32);
    let reqs = mixed(&engine);
    let (req, prep) = &reqs[0];
    let need = prep.ids.len() + req.max_new_tokens;
    // Room for one sequence at a time: the second waits until the first ends.
    let mut s = Scheduler::new(&engine, SchedulerOptions { max_batch: 8, max_queue: 2, kv_budget: need + 10, prefill_chunk: 64, ..SchedulerOptions::single() });
    let first = s.submit_prepared(req.clone(), prep.clone()).unwrap();
    let second = s.submit_prepared(req.clone(), prep.clone()).unwrap();
    s.step();
    assert_eq!((s.running(), s.queued()), (1, 1), "the KV budget admits one");
    s.submit_prepared(req.clone(), prep.clone()).unwrap();
    let e = s.submit_prepared(req.clone(), prep.clone()).unwrap_err();
    assert!(matches!(e, Error::QueueFull(2)), "{e}");
    assert!(e.to_string().contains("busy"), "{e}");
    let mut big = req.clone();
    big.max_new_tokens = 100;
    let e = s.submit_prepared(big, prep.clone()).unwrap_err().to_string();
    assert!(e.contains("KV budget"), "{e}");
    let mut order = Vec::new();
    while !s.is_idle() {
        for e in s.step() {
            if let Event::Done { id, .. } = e {
                order.push(id);
            }
        }
    }
    assert_eq!(&order[..2], &[first, second]);
    // Bad requests fail at submit, not later.
    let mut bad = req.clone();
    bad.sampling.min_p = 2.0;
    assert!(s.submit_prepared(bad, prep.clone()).unwrap_err().to_string().contains("min_p"));
    let mut empty = req.clone();
    empty.max_new_tokens = 0;
    assert!(s.submit_prepared(empty, prep.clone()).is_err());
}

#[test]
fn the_8_bit_kv_cache_batches_with_the_same_bits() {
    let opts_q8 = phi4mm::LoadOptions { dtype: DType::BF16, kv_cache: phi4mm::decoder::kv_cache::KvFormat::Q8, ..Default::default() };
    let engine = Engine::load(&tiny(), opts_q8).unwrap();
    let reqs: Vec<_> = mixed(&engine).into_iter().take(4).collect();
    let together = run_all(&engine, opts(4, DEFAULT_PREFILL_CHUNK), &reqs);
    for (i, r) in reqs.iter().enumerate() {
        let alone = run_all(&engine, opts(1, DEFAULT_PREFILL_CHUNK), std::slice::from_ref(r));
        assert_eq!(alone[0], together[i], "request {i} with the 8-bit cache");
    }
}

/// Scheduler options with the prefix and media caches on.
fn cached(kv_budget: usize) -> SchedulerOptions {
    SchedulerOptions { prefix_cache: true, media_cache_bytes: 64 << 20, kv_budget, ..opts(8, DEFAULT_PREFILL_CHUNK) }
}

/// A system prompt of a few hundred tokens, so conversations span several 256-row blocks.
fn system() -> Message {
    let words: Vec<String> = (0..420).map(|i| format!("rule{} ", i * 37 % 1000)).collect();
    Message::new("system", words.concat())
}

/// Turn 1 (`first` with its media) and turn 2 (turn 1, the reply, then `second`).
fn conversation(engine: &Engine, first: &str, images: &[&str], audios: &[&str], second: &str) -> Completion {
    let mut s = Scheduler::new(engine, cached(1 << 20));
    let mut t1 = chat(first, images, audios);
    let PromptInput::Chat(msgs) = &mut t1.prompt else { unreachable!() };
    msgs.insert(0, system());
    let p1 = engine.prepare(&t1).unwrap();
    let c1 = run_on(&mut s, &[(t1.clone(), p1.clone())]).remove(0);
    assert_eq!(c1.cached_tokens, 0, "nothing is cached before turn 1");
    let mut t2 = t1.clone();
    let PromptInput::Chat(msgs) = &mut t2.prompt else { unreachable!() };
    msgs.push(Message::new("assistant", c1.text.clone()));
    msgs.push(Message::new("user", second.to_string()));
    let p2 = engine.prepare(&t2).unwrap();
    assert_eq!(&p2.ids[..p1.ids.len()], &p1.ids[..], "turn 2 starts with turn 1's prompt");
    let media_before = s.cache_stats().media_misses;
    let warm = run_on(&mut s, &[(t2.clone(), p2.clone())]).remove(0);
    let cold = engine.generate_prepared(&p2, &t2, |_| true).unwrap();
    assert_eq!((&warm.tokens, bits(&warm)), (&cold.tokens, bits(&cold)), "turn 2 with the prefix cache equals a cold run");
    assert_eq!(cold.cached_tokens, 0);
    // Every full block of turn 1's prompt is reused; the media are not encoded again.
    assert!(warm.cached_tokens >= p1.ids.len() / DEFAULT_PREFILL_CHUNK * DEFAULT_PREFILL_CHUNK, "{} cached", warm.cached_tokens);
    assert!(warm.cached_tokens > 0 && warm.cached_tokens % DEFAULT_PREFILL_CHUNK == 0);
    assert_eq!(s.cache_stats().media_misses, media_before, "the media came from the cache");
    warm
}

#[test]
fn turn_two_of_a_conversation_reuses_the_prefix_and_the_media_and_equals_a_cold_run() {
    let engine = load_tiny(DType::F32);
    conversation(&engine, "What is shown?", &["wide_500x300.png"], &[], "And which colours?");
    conversation(&engine, "Transcribe the audio clip into text.", &[], &["speech_10s_16k.wav"], "Now in French.");
    let bf16 = load_tiny(DType::BF16);
    conversation(&bf16, "Answer the spoken question about the image.", &["square_448x448.png"], &["speech_1s_16k.wav"], "Why?");
}

#[test]
fn a_repeated_mixed_batch_is_served_from_the_cache_with_the_cold_bits() {
    let engine = load_tiny(DType::F32);
    let reqs = mixed(&engine);
    let cold = run_all(&engine, opts(8, DEFAULT_PREFILL_CHUNK), &reqs);
    let mut s = Scheduler::new(&engine, cached(1 << 20));
    for round in 0..2 {
        let got = run_on(&mut s, &reqs);
        for (i, c) in got.iter().enumerate() {
            assert_eq!((c.tokens.clone(), bits(c)), cold[i], "round {round}: request {i} differs from the cold run");
        }
        // Round 2: the 4090-token prompt restores its 15 full blocks (the re-prefill after the
        // LongRoPE crossing restores its long-mode blocks too).
        assert_eq!(got[6].cached_tokens, if round == 0 { 0 } else { 15 * DEFAULT_PREFILL_CHUNK });
    }
    let st = s.cache_stats();
    assert!(st.media_hits >= 4, "{st:?}");
    assert!(st.reused_positions as usize >= 2 * 15 * DEFAULT_PREFILL_CHUNK, "prompt and re-prefill blocks reused: {st:?}");
}

#[test]
fn adapters_never_share_blocks_and_eviction_keeps_to_the_budget() {
    let engine = load_tiny(DType::F32);
    let with_system = |mut r: GenerateRequest| {
        let PromptInput::Chat(msgs) = &mut r.prompt else { unreachable!() };
        msgs.insert(0, system());
        let p = engine.prepare(&r).unwrap();
        (r, p)
    };
    let text = with_system(chat("Say hello.", &[], &[]));
    let speech = with_system(chat("Transcribe the audio clip into text.", &[], &["speech_1s_16k.wav"]));
    let text2 = with_system(chat("Say goodbye.", &[], &[]));
    // Budget: one sequence and two blocks.
    let need = text.1.ids.len().max(speech.1.ids.len()) + 12;
    let mut s = Scheduler::new(&engine, cached(need + 2 * DEFAULT_PREFILL_CHUNK));
    for (r, p) in [&text, &text2, &speech, &text] {
        let warm = run_on(&mut s, &[(r.clone(), p.clone())]).remove(0);
        let cold = engine.generate_prepared(p, r, |_| true).unwrap();
        assert_eq!((&warm.tokens, bits(&warm)), (&cold.tokens, bits(&cold)));
        if p.mode != phi4mm::Mode::Text {
            assert_eq!(warm.cached_tokens, 0, "the speech adapter's KV differs: no text block is reused");
        }
    }
    let st = s.cache_stats();
    assert!(st.hits >= 1 && st.evicted_blocks > 0, "{st:?}");
    assert!(st.positions <= 2 * DEFAULT_PREFILL_CHUNK);
}

#[test]
fn media_and_prompts_are_prepared_a_piece_per_step_while_streams_decode() {
    let engine = load_tiny(DType::F32);
    let one = SchedulerOptions { pieces_per_step: Some(1), ..opts(4, 64) };
    let mut s = Scheduler::new(&engine, one);
    let mut stream = chat("Tell me about Rust.", &[], &[]);
    stream.max_new_tokens = 2000;
    let stream_prep = engine.prepare(&stream).unwrap();
    let sid = s.submit_prepared(stream.clone(), stream_prep.clone()).unwrap();
    while s.step().iter().all(|e| !matches!(e, Event::Token { .. })) {}
    // An image + audio question and a 300-row text prompt (5 chunks of 64) arrive.
    let mut late = vec![chat("Answer the spoken question about the image.", &["wide_500x300.png"], &["speech_10s_16k.wav"])];
    late.push(chat("", &[], &[]));
    let late: Vec<(GenerateRequest, Prepared)> = vec![
        (late[0].clone(), engine.prepare(&late[0]).unwrap()),
        (late[1].clone(), Prepared::text((0..300u32).map(|i| 700 + i * 13).collect())),
    ];
    let crops = late[0].1.images[0].crops() + 1;
    let ids: Vec<RequestId> = late.iter().map(|(r, p)| s.submit_prepared(r.clone(), p.clone()).unwrap()).collect();
    let (mut steps, mut first_token) = (0, HashMap::new());
    let mut done = HashMap::new();
    let mut crop_progress = Vec::new();
    while done.len() < ids.len() {
        let events = s.step();
        steps += 1;
        let stream_tokens = events.iter().filter(|e| matches!(e, Event::Token { id, .. } if *id == sid)).count();
        assert_eq!(stream_tokens, 1, "step {steps}: the running stream gets its token while the others prepare");
        for e in events {
            match e {
                Event::Token { id, .. } if id != sid => {
                    first_token.entry(id).or_insert(steps);
                }
                Event::Progress { id, stage: phi4mm::scheduler::Stage::Images, done, total } if id == ids[0] => crop_progress.push((done, total)),
                Event::Done { id, completion } => {
                    done.insert(id, completion);
                }
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
                _ => {}
            }
        }
    }
    // Each crop went through the tower in several pieces (embedding, then a third of a layer each),
    // so the image request took many steps, the crops reported one by one.
    assert!(first_token[&ids[0]] >= 3 * crops, "{} steps for {crops} crops", first_token[&ids[0]]);
    assert_eq!(crop_progress, (1..=crops).map(|c| (c, crops)).collect::<Vec<_>>());
    // Five chunks, each block in three pieces (3 blocks): at least 45 pieces for the text prompt.
    assert!(first_token[&ids[1]] >= 45, "{} steps", first_token[&ids[1]]);
    // Sliced or not, the numbers are those of a request alone.
    for (i, (r, p)) in late.iter().enumerate() {
        let alone = run_all(&engine, opts(1, 64), std::slice::from_ref(&(r.clone(), p.clone())));
        let c = &done[&ids[i]];
        assert_eq!((c.tokens.clone(), bits(c)), alone[0], "late request {i}");
    }
    assert!(s.cancel(sid));
    let c = s.step().into_iter().find_map(|e| match e {
        Event::Cancelled { completion, .. } => completion,
        _ => None,
    });
    let c = c.expect("the stream's partial completion");
    let mut alone = stream.clone();
    alone.max_new_tokens = c.tokens.len();
    let a = run_all(&engine, opts(1, 64), &[(alone, stream_prep)]);
    assert_eq!((c.tokens.clone(), bits(&c)), a[0], "the stream");
}
