// Trains a parity case with tf.train.adadelta on the CPU backend.
// stdin: {"kwargs": {...}, "params": [[...], ...], "grads": [[[...], ...], ...]} (flat float32
// lists), and optionally "weights": [{"name", "dtype", "values"}, ...] to pass to
// optimizer.setWeights() before the first step (a saved state, "iter" first).
// stdout: {"version", "epsilon", "params", "e_g2", "e_dx2"}: per step, one flat list per leaf;
// "iterations" (optimizer.iterations at the end) and "weights" (optimizer.getWeights() at the
// end, each {"name", "dtype", "values"}).
import * as tf from "@tensorflow/tfjs-core";
import "@tensorflow/tfjs-backend-cpu";
import { readFileSync } from "node:fs";

const input = JSON.parse(readFileSync(0, "utf8"));
await tf.setBackend("cpu");
const { learning_rate = 0.001, rho = 0.95, epsilon = null } = input.kwargs;
const optimizer = tf.train.adadelta(learning_rate, rho, epsilon);
const variables = input.params.map((p, i) => tf.variable(tf.tensor1d(p, "float32"), true, `leaf${i}`));
if (input.weights) {
  await optimizer.setWeights(
    input.weights.map((w) => ({ name: w.name, tensor: tf.tensor(w.values, undefined, w.dtype) }))
  );
}
const out = { version: tf.version_core, epsilon: optimizer.epsilon, params: [], e_g2: [], e_dx2: [] };
for (const stepGrads of input.grads) {
  const named = {};
  stepGrads.forEach((g, i) => { named[`leaf${i}`] = tf.tensor1d(g, "float32"); });
  optimizer.applyGradients(named);
  Object.values(named).forEach((t) => t.dispose());
  out.params.push(variables.map((v) => Array.from(v.dataSync())));
  out.e_g2.push(optimizer.accumulatedGrads.map((a) => Array.from(a.variable.dataSync())));
  out.e_dx2.push(optimizer.accumulatedUpdates.map((a) => Array.from(a.variable.dataSync())));
}
out.iterations = optimizer.iterations;
out.weights = (await optimizer.getWeights()).map((w) => ({
  name: w.name, dtype: w.tensor.dtype, values: Array.from(w.tensor.dataSync()),
}));
process.stdout.write(JSON.stringify(out));
