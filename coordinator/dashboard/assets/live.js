// Live events over SSE, handed on in batches: a few repaints a second however fast they come.

import { eventsUrl } from "./api.js";

const FLUSH_MS = 250;
const MAX_BUFFER = 20000; // events held between flushes; older ones are dropped (counted)

/**
 * Follows /api/events with `params` (WatchRequest fields) and calls `onBatch(events, dropped)`
 * at most every 250 ms. EventSource resends Last-Event-ID on reconnect, so nothing is lost
 * across a dropped connection; `close()` ends it.
 */
export class LiveEvents {
  constructor(params, onBatch, onStatus = () => {}) {
    this.buffer = [];
    this.dropped = 0;
    this.onBatch = onBatch;
    this.onStatus = onStatus;
    this.source = new EventSource(eventsUrl(params));
    this.source.onmessage = (msg) => this.receive(msg.data);
    this.source.onopen = () => this.onStatus("live");
    this.source.onerror = () => this.onStatus(this.source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
    this.timer = setInterval(() => this.flush(), FLUSH_MS);
  }

  receive(data) {
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      return;
    }
    const events = Array.isArray(parsed?.events) ? parsed.events : [];
    for (const e of events) this.buffer.push(e);
    if (this.buffer.length > MAX_BUFFER) {
      const cut = this.buffer.length - MAX_BUFFER;
      this.buffer.splice(0, cut);
      this.dropped += cut;
    }
  }

  flush() {
    if (!this.buffer.length && !this.dropped) return;
    const batch = this.buffer;
    const dropped = this.dropped;
    this.buffer = [];
    this.dropped = 0;
    this.onBatch(batch, dropped);
  }

  close() {
    clearInterval(this.timer);
    this.source.close();
  }
}
