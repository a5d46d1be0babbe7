"""mmdetection / mmsegmentation integration."""
