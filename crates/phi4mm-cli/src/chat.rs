//! `phi4mm chat`: an interactive conversation. Lines starting with `/` are commands:
//! `/image PATH` and `/audio PATH` attach media to the next message, `/system TEXT` sets the
//! system message, `/reset` forgets the conversation, `/exit` quits.
//!
//! Every turn re-sends the whole conversation, as a chat client does; the scheduler's prefix
//! cache keeps the earlier turns' KV and the encoded media, so a turn only prefills what is
//! new (the answers are the same bits as without the cache).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use phi4mm::{Event, MediaInput, Message, PromptInput, Scheduler};

use crate::common::{print_piece, scheduler_options, ModelArgs};
use crate::run::{system_message, GenArgs};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// JSON file with tool definitions.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// KV budget of the conversation's prefix cache: GiB (`8`, `8GiB`, `512MiB`) or positions
    /// (`20000tok`); default half the available memory.
    #[arg(long)]
    pub kv_budget: Option<String>,
}

/// The conversation so far and the media bound to its markers.
#[derive(Default)]
struct Conversation {
    messages: Vec<Message>,
    images: Vec<MediaInput>,
    audios: Vec<MediaInput>,
    pending_images: Vec<PathBuf>,
    pending_audios: Vec<PathBuf>,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let (engine, load_s) = a.model.load()?;
    eprintln!(
        "loaded {} in {load_s:.1}s. Type a message; /image PATH, /audio PATH, /system TEXT, /reset, /exit.",
        engine.model_dir().display()
    );
    let mut sched = Scheduler::new(&engine, scheduler_options(&engine, a.kv_budget.as_deref(), None)?);
    let mut system = system_message(a.system.as_deref(), a.tools.as_ref())?;
    let mut conv = Conversation::default();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    conv = Conversation::default();
                    eprintln!("(conversation cleared)");
                }
                "system" => {
                    system = Some(Message::new("system", arg));
                    eprintln!("(system message set)");
                }
                "image" | "audio" => {
                    let p = PathBuf::from(arg.trim());
                    if let Err(e) = std::fs::File::open(&p) {
                        eprintln!("cannot read {}: {e}", p.display());
                    } else if name == "image" {
                        conv.pending_images.push(p);
                    } else {
                        conv.pending_audios.push(p);
                    }
                }
                other => eprintln!("unknown command /{other}"),
            }
            continue;
        }
        let (ni, na) = (conv.pending_images.len(), conv.pending_audios.len());
        let content = match phi4mm::text::prompt::user_content(line, ni, na) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let mut messages: Vec<Message> = system.iter().cloned().collect();
        messages.extend(conv.messages.iter().cloned());
        messages.push(Message::new("user", content.clone()));
        let mut req = a.gen.request(PromptInput::Chat(messages));
        req.images = conv.images.clone();
        req.images.extend(conv.pending_images.iter().cloned().map(MediaInput::Path));
        req.audios = conv.audios.clone();
        req.audios.extend(conv.pending_audios.iter().cloned().map(MediaInput::Path));
        let result = sched.submit(req.clone()).and_then(|id| sched.run_to_end(id, print_tokens));
        println!();
        match result {
            Ok(c) => {
                conv.messages.push(Message::new("user", content));
                conv.messages.push(Message::new("assistant", c.text));
                conv.images = req.images;
                conv.audios = req.audios;
                conv.pending_images.clear();
                conv.pending_audios.clear();
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}

/// Streams each token's text to stdout.
fn print_tokens(e: &Event) -> bool {
    if let Event::Token { text, .. } = e {
        print_piece(text);
    }
    true
}
