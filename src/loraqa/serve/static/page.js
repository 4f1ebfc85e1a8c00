"use strict";
// loraqa serve's page: sends the paragraph and the questions to POST v1/answer and marks each answer's span
// in the paragraph. Spans are offsets in code points (Python's string indices); JavaScript strings index
// UTF-16 units, so the paragraph is cut as an array of code points. Text from the user or the model is only
// ever set as textContent, never parsed as HTML.

const $ = (id) => document.getElementById(id);

// The first paragraph of SQuAD v1.1's dev set (from Wikipedia's "Super Bowl 50", CC BY-SA).
const EXAMPLE = {
  context: "Super Bowl 50 was an American football game to determine the champion of the National Football " +
    "League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated " +
    "the National Football Conference (NFC) champion Carolina Panthers 24\u201310 to earn their third Super " +
    "Bowl title. The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at " +
    "Santa Clara, California. As this was the 50th Super Bowl, the league emphasized the \"golden " +
    "anniversary\" with various gold-themed initiatives, as well as temporarily suspending the tradition of " +
    "naming each Super Bowl game with Roman numerals (under which the game would have been known as \"Super " +
    "Bowl L\"), so that the logo could prominently feature the Arabic numerals 50.",
  questions: ["Where did Super Bowl 50 take place?", "What was the final score of Super Bowl 50?",
              "What color was used to emphasize the 50th anniversary of the Super Bowl?"],
};

function addText(parent, tag, text, className) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (className) el.className = className;
  parent.append(el);
  return el;
}

function describeRun(info) {
  const run = $("run");
  run.textContent = "Base model ";
  addText(run, "strong", info.base_model);
  run.append(" \u00b7 adapter ");
  addText(run, "strong", info.adapter || "none (zero-shot)");
  run.append(" \u00b7 ");
  const m = info.metrics;
  if (m && m.exact_match != null && m.f1 != null) {
    addText(run, "strong", `EM ${m.exact_match.toFixed(2)} / F1 ${m.f1.toFixed(2)}`);
    run.append(` on ${(m.n_questions || 0).toLocaleString("en")} dev questions (its metrics.json)`);
  } else {
    run.append(info.adapter ? "EM/F1 not measured yet (no metrics.json)" : "no EM/F1 (zero-shot)");
  }
  const words = Math.floor(info.context_tokens * 0.75);
  $("context-hint").textContent = `At most ${info.context_tokens} tokens (about ${words} words).`;
  $("questions-hint").textContent = `At most ${info.max_questions} questions.`;
}

async function loadInfo() {
  try {
    const response = await fetch("health");
    describeRun(await response.json());
  } catch (e) {
    $("run").textContent = "The server's description (GET health) could not be read.";
  }
}

// The paragraph cut where any answer's span starts or ends: [{text, questions: [indices covering it]}].
function segments(context, answers) {
  const points = Array.from(context);
  const cuts = new Set([0, points.length]);
  answers.forEach((a) => { if (a.span) { cuts.add(a.span[0]); cuts.add(a.span[1]); } });
  const sorted = [...cuts].sort((x, y) => x - y);
  const out = [];
  for (let i = 0; i + 1 < sorted.length; i++) {
    const [start, end] = [sorted[i], sorted[i + 1]];
    const covering = [];
    answers.forEach((a, q) => { if (a.span && a.span[0] <= start && end <= a.span[1]) covering.push(q); });
    const text = points.slice(start, end).join("");
    const last = out[out.length - 1];
    if (last && last.questions.join() === covering.join()) last.text += text;
    else out.push({ text, questions: covering });
  }
  return out;
}

function render(context, answers) {
  const list = $("answers");
  list.textContent = "";
  answers.forEach((a, q) => {
    const item = document.createElement("li");
    addText(item, "span", a.question, "question");
    item.append(" \u2192 ");
    addText(item, "span", a.answer || "(no answer)", "answer");
    if (!a.span) addText(item, "span", " (not in the paragraph as written)", "note");
    addText(item, "span", ` ${a.seconds.toFixed(2)} s`, "time");
    item.dataset.q = String(q + 1);
    list.append(item);
  });
  const paragraph = $("highlighted");
  paragraph.textContent = "";
  for (const seg of segments(context, answers)) {
    if (!seg.questions.length) { paragraph.append(seg.text); continue; }
    const mark = addText(paragraph, "mark", seg.text,
                         seg.questions.length === 1 ? `c${seg.questions[0] % 6}` : "many");
    mark.title = seg.questions.map((q) => `${q + 1}. ${answers[q].question}`).join("\n");
    mark.dataset.q = seg.questions.map((q) => q + 1).join(",");
    addText(paragraph, "sup", mark.dataset.q, "tag");
  }
  $("result").hidden = false;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function ask() {
  const context = $("context").value;
  const questions = $("questions").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!context.trim()) return setStatus("Paste a paragraph first.", true);
  if (!questions.length) return setStatus("Ask at least one question.", true);
  $("ask").disabled = true;
  setStatus(`Answering ${questions.length} question${questions.length > 1 ? "s" : ""}\u2026`, false);
  try {
    const response = await fetch("v1/answer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ context, questions }),
    });
    let data;
    try { data = await response.json(); } catch (e) { data = { error: `the server answered ${response.status}` }; }
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      return setStatus(data.error + (retry ? ` Try again in ${retry} s.` : ""), true);
    }
    render(context, data.answers);
    setStatus(`Answered in ${Math.max(...data.answers.map((a) => a.seconds)).toFixed(2)} s.`, false);
  } catch (e) {
    setStatus("The server could not be reached.", true);
  } finally {
    $("ask").disabled = false;
  }
}

function init() {
  $("ask-form").addEventListener("submit", (event) => { event.preventDefault(); ask(); });
  for (const id of ["context", "questions"]) {  // Ctrl+Enter (Cmd+Enter) answers
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask-form").requestSubmit();
    });
  }
  $("example").addEventListener("click", () => {
    $("context").value = EXAMPLE.context;
    $("questions").value = EXAMPLE.questions.join("\n");
  });
  loadInfo();
}

init();
