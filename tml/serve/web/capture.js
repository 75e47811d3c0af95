// AudioWorklet: microphone samples -> mono at the layout's rate, posted to the page in 20 ms blocks.
// The page asks for an AudioContext at the layout's rate, so the browser's own resampler usually does the work and
// this passes samples through; if the context runs at another rate, samples are resampled here (box filter over the
// rate ratio against aliasing, then linear interpolation).
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.outRate = options.processorOptions.outRate;
    this.step = sampleRate / this.outRate;            // input samples per output sample
    this.width = Math.max(1, Math.round(this.step));  // box filter length when downsampling
    this.hist = new Float32Array(this.width);         // last inputs, for the box filter
    this.h = 0;
    this.prev = 0;                                    // previous filtered input sample
    this.pos = 0;                                     // next output position, in input samples since prev
    this.block = new Float32Array(Math.round(this.outRate * 0.02));
    this.fill = 0;
  }
  emit(x) {
    this.block[this.fill++] = x;
    if (this.fill === this.block.length) {
      this.port.postMessage(this.block.slice(0));
      this.fill = 0;
    }
  }
  process(inputs, outputs) {
    const input = inputs[0];
    if (input && input.length) {
      const ch = input[0];
      for (let i = 0; i < ch.length; i++) {
        let x = 0;
        for (let c = 0; c < input.length; c++) x += input[c][i];
        x /= input.length;
        if (this.step === 1) { this.emit(x); continue; }
        this.hist[this.h] = x; this.h = (this.h + 1) % this.width;
        let cur = 0;
        for (let k = 0; k < this.width; k++) cur += this.hist[k];
        cur /= this.width;
        // outputs fall between prev (at 0) and cur (at 1)
        while (this.pos <= 1) { this.emit(this.prev + (cur - this.prev) * this.pos); this.pos += this.step; }
        this.pos -= 1;
        this.prev = cur;
      }
    }
    if (outputs[0] && outputs[0][0]) outputs[0][0].fill(0);  // silent: connected only so the graph pulls it
    return true;
  }
}
registerProcessor('capture', Capture);
