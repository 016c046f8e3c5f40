//! `phi4mm eval`: run the model over a JSON-lines set through the batching scheduler and score
//! the predictions (`--data`), or score existing predictions without a model (`--score`).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use phi4mm::eval::{self, BleuTokenize, Example, Scores, Task};
use phi4mm::{Engine, Event, RequestId, Scheduler};

use crate::common::ModelArgs;
use crate::run::GenArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// asr (WER, CER), ast (BLEU) or vqa (accuracy). With --score and no task: every metric.
    #[arg(long)]
    pub task: Option<String>,
    /// The set to run: JSON lines of {"audio"|"image": path(s), "instruction"?, "target"}.
    #[arg(long, conflicts_with = "score", required_unless_present = "score")]
    pub data: Option<PathBuf>,
    /// Score existing predictions: JSON lines of {"reference", "prediction"}; no model loaded.
    #[arg(long)]
    pub score: Option<PathBuf>,
    /// For --task ast: the language lines without an instruction translate into.
    #[arg(long)]
    pub translate_to: Option<String>,
    /// Text normaliser applied to both sides before WER/CER: none (jiwer's default transforms
    /// only) or whisper-en (Whisper's English normaliser, as the Open ASR leaderboard).
    #[arg(long, default_value = "none")]
    pub normalize: String,
    /// sacreBLEU tokenizer: 13a (its default), zh, char (e.g. for Korean or Japanese), intl, none.
    #[arg(long, default_value = "13a")]
    pub bleu_tokenize: String,
    /// Write each prediction here, one JSON line each (re-scorable with --score).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object with the metrics instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Most requests decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let task = a.task.as_deref().map(|t| Task::parse(t, a.translate_to.as_deref())).transpose()?;
    let tok = BleuTokenize::parse(&a.bleu_tokenize)?;
    let normalize = eval::Normalize::parse(&a.normalize)?;
    let pairs = match (&a.score, &a.data) {
        (Some(path), _) => read_predictions(path)?,
        (None, Some(data)) => {
            let Some(task) = &task else { bail!("--data needs --task (asr, ast or vqa)") };
            let examples = eval::read_examples(data)?;
            let (engine, _) = a.model.load()?;
            let rows = predict(&engine, &a, task, &examples)?;
            if let Some(out) = &a.out {
                write_rows(out, &rows)?;
            }
            rows.into_iter().map(|r| (r.reference, r.prediction)).collect()
        }
        (None, None) => bail!("give --data (a set to run) or --score (predictions to score)"),
    };
    let norm = |s: &str| normalize.apply(s);
    let scores = eval::score(&pairs, task.as_ref(), tok, (normalize != eval::Normalize::None).then_some(&norm as &dyn Fn(&str) -> String));
    if a.json {
        println!("{}", scores_json(&scores));
    } else {
        print_summary(&scores, normalize.name());
    }
    Ok(())
}

/// One prediction, as `--out` writes it.
#[derive(serde::Serialize)]
struct Row {
    line: usize,
    reference: String,
    prediction: String,
}

/// `{"reference", "prediction"}` lines (other keys are ignored).
fn read_predictions(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let field = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(anyhow::anyhow!("{} line {}: needs a string \"{k}\"", path.display(), i + 1)),
        };
        pairs.push((field("reference")?, field("prediction")?));
    }
    if pairs.is_empty() {
        bail!("{} has no predictions", path.display());
    }
    Ok(pairs)
}

/// Runs every example through one scheduler, keeping at most twice the batch in flight.
fn predict(engine: &Engine, a: &EvalArgs, task: &Task, examples: &[Example]) -> Result<Vec<Row>> {
    let mut opts = phi4mm::SchedulerOptions::for_engine(engine);
    opts.max_batch = a.batch.max(1);
    let mut sched = Scheduler::new(engine, opts);
    let bar = ProgressBar::new(examples.len() as u64);
    bar.set_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({per_sec}, {eta})").unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.set_message(format!("eval {}", task.name()));
    let mut pending: HashMap<RequestId, usize> = HashMap::new();
    let mut preds: Vec<Option<String>> = vec![None; examples.len()];
    let mut next = 0;
    while next < examples.len() || !pending.is_empty() {
        while next < examples.len() && pending.len() < 2 * a.batch.max(1) {
            let ex = &examples[next];
            let id = sched.submit(ex.request(task, |p| a.gen.request(p))?).with_context(|| format!("line {}", ex.line))?;
            pending.insert(id, next);
            next += 1;
        }
        for e in sched.step() {
            let id = e.id();
            let Some(&i) = pending.get(&id) else { continue };
            match e {
                Event::Done { completion, .. } => preds[i] = Some(completion.text.trim().to_string()),
                Event::Failed { error, .. } => bail!("line {}: {error}", examples[i].line),
                Event::Cancelled { .. } => bail!("line {}: cancelled", examples[i].line),
                _ => continue,
            }
            pending.remove(&id);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(examples.iter().zip(preds).map(|(ex, p)| Row { line: ex.line, reference: ex.target.clone(), prediction: p.unwrap_or_default() }).collect())
}

fn write_rows(path: &std::path::Path, rows: &[Row]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?);
    for r in rows {
        writeln!(f, "{}", serde_json::to_string(r)?)?;
    }
    f.flush()?;
    Ok(())
}

fn scores_json(s: &Scores) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("n".into(), s.n.into());
    for (k, v) in [("wer", s.wer), ("cer", s.cer), ("accuracy", s.accuracy)] {
        if let Some(v) = v {
            o.insert(k.into(), v.into());
        }
    }
    if let Some(b) = &s.bleu {
        o.insert("bleu".into(), b.score.into());
        o.insert("bleu_signature".into(), b.signature.clone().into());
    }
    serde_json::Value::Object(o)
}

fn print_summary(s: &Scores, normalize: &str) {
    println!("n          {}", s.n);
    if let (Some(w), Some(c)) = (s.wer, s.cer) {
        println!("WER        {:.2}%  (normalize: {normalize})", 100.0 * w);
        println!("CER        {:.2}%", 100.0 * c);
    }
    if let Some(b) = &s.bleu {
        println!("BLEU       {:.2}  ({})", b.score, b.signature);
    }
    if let Some(acc) = s.accuracy {
        println!("accuracy   {:.2}%", 100.0 * acc);
    }
}
