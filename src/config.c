int arq_placeholder_(void); int arq_placeholder_(void){return 0;}
